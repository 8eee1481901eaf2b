package floor

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// efd is one eventfd used exactly as go/shmclient/eventfd.go uses the session's: posted
// with a raw write(2) of the value 1, waited on with ppoll(2) (a blocking system call,
// holding its OS thread, never the runtime's netpoller), then drained with one read(2).
type efd struct {
	fd   int
	file *os.File // what exec hands to the peer; never used for I/O
}

// newEventfd creates a counter-mode eventfd. It is created blocking so that os.NewFile
// does not register it with the netpoller (it would for a non-blocking descriptor), and
// made O_NONBLOCK once the peer has it (makeNonblocking): the flag belongs to the open
// file description both processes share, as the daemon's eventfds are (SPEC §4.5).
func newEventfd(name string) (*efd, error) {
	fd, _, errno := syscall.RawSyscall(syscall.SYS_EVENTFD2, 0, syscall.O_CLOEXEC, 0)
	if errno != 0 {
		return nil, fmt.Errorf("eventfd2: %w", errno)
	}
	return &efd{fd: int(fd), file: os.NewFile(fd, name)}, nil
}

func (e *efd) makeNonblocking() error {
	flags, _, errno := syscall.RawSyscall(syscall.SYS_FCNTL, uintptr(e.fd), syscall.F_GETFL, 0)
	if errno == 0 {
		_, _, errno = syscall.RawSyscall(syscall.SYS_FCNTL, uintptr(e.fd), syscall.F_SETFL, flags|syscall.O_NONBLOCK)
	}
	if errno != 0 {
		return fmt.Errorf("fcntl(O_NONBLOCK) on an eventfd: %w", errno)
	}
	return nil
}

func (e *efd) close() { _ = e.file.Close() }

var one = func() (b [8]byte) {
	binary.NativeEndian.PutUint64(b[:], 1)
	return
}()

// post is shmclient's eventfd.post: a raw write, which never blocks (O_NONBLOCK).
func (e *efd) post() error {
	for {
		_, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(e.fd), uintptr(unsafe.Pointer(&one[0])), 8)
		if errno != syscall.EINTR {
			if errno != 0 && errno != syscall.EAGAIN {
				return errno
			}
			return nil
		}
	}
}

type pollfd struct {
	fd      int32
	events  int16
	revents int16
}

// wait is shmclient's eventfd.wait: ppoll(2) until readable, then one raw read(2) that
// takes every pending post; false when d passes first. A signal (the runtime's
// preemption, EINTR) sleeps again for what is left.
func (e *efd) wait(d time.Duration) bool {
	end := time.Now().Add(d)
	for {
		left := time.Until(end)
		if left <= 0 {
			return false
		}
		pfd := pollfd{fd: int32(e.fd), events: 0x1} // POLLIN
		ts := syscall.NsecToTimespec(int64(left))
		n, _, errno := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
		if errno == 0 && n > 0 && pfd.revents&0x1 != 0 {
			var buf [8]byte
			syscall.RawSyscall(syscall.SYS_READ, uintptr(e.fd), uintptr(unsafe.Pointer(&buf[0])), 8)
			return true
		}
	}
}

// EventfdPingPong measures round trips Go -> Python -> Go through two eventfds, with no
// payload and no shared memory: Go posts A and sleeps in ppoll on B; the peer, asleep in
// epoll on A as the daemon's dispatcher is, drains A and posts B through tensord's native
// ring core (the call the daemon wakes a client with). The cost of waking a blocked
// process and being woken back. peerCmd is the floor_peer.py command line without its
// mode arguments.
func EventfdPingPong(ctx context.Context, peerCmd []string, lim Limits) (*hdrhistogram.Histogram, error) {
	a, err := newEventfd("floor-a")
	if err != nil {
		return nil, err
	}
	defer a.close()
	b, err := newEventfd("floor-b")
	if err != nil {
		return nil, err
	}
	defer b.close()
	argv := append(append([]string{}, peerCmd...), "eventfd", "--idle", "1")
	p, err := startPeer(ctx, argv, []*os.File{a.file, b.file}) // fds 3 and 4 there
	if err != nil {
		return nil, err
	}
	defer p.stop()
	for _, e := range []*efd{a, b} {
		if err := e.makeNonblocking(); err != nil {
			return nil, err
		}
	}
	round := func() (time.Duration, error) {
		if lim.Gap > 0 {
			time.Sleep(lim.Gap)
		}
		t0 := time.Now()
		if err := a.post(); err != nil {
			return 0, fmt.Errorf("eventfd ping-pong: post: %w", err)
		}
		if !b.wait(time.Second) {
			return 0, fmt.Errorf("eventfd ping-pong: the peer did not answer in 1 s")
		}
		return time.Since(t0), nil
	}
	return pingPong(lim, round)
}
