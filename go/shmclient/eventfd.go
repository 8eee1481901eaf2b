package shmclient

import (
	"context"
	"encoding/binary"
	"os"
	"strconv"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The session's wake-ups are four eventfds that the daemon creates (counter mode,
// O_NONBLOCK) and passes with the welcome (SPEC §2.4, §4.5). This file is all the client
// does with them, in plain system calls (golang.org/x/sys/unix, pure Go): no cgo, and no
// runtime netpoller. The
// descriptors are shared with the daemon, so their O_NONBLOCK flag (which belongs to the
// open file description both processes hold) is never changed, and they are never
// wrapped in os.File or net.Conn, which would register them with the netpoller. A waiter
// blocks in ppoll(2) and so holds an OS thread while it sleeps; the client has at most one
// waiter per eventfd per session (the reader role for pd, the request-ring writer lock
// for rs), so a session costs at most one sleeping thread per waiting role.

// Eventfd indexes in segment.efds; descriptor i+1 of the welcome (SPEC §4.5).
const (
	efdReqData   = iota // rd: posted by the client after publishing a request
	efdReqSpace         // rs: posted by the daemon after releasing request space
	efdRespData         // pd: posted by the daemon after publishing a response
	efdRespSpace        // ps: posted by the client after releasing response space
	numEventfds
)

// waitSlice bounds each sleep on an eventfd. No wake-up is ever lost (both sides issue
// real barriers, SPEC §4.5), so this is not a safety net for the protocol: it is how
// often a waiter re-checks, unprompted, whether it should give up. Everything that ends
// a wait early (Close, the daemon's death, a cancelled context) also posts the eventfd,
// so in practice the bound only matters for a deadline, which shortens the slice itself.
const waitSlice = 50 * time.Millisecond

// eventfd is one wake-up descriptor. fd is -1 (or the *eventfd nil) for none, only in
// tests that read a ring image without a peer: posting and waiting are then no-ops.
type eventfd struct {
	fd int
}

// eventfdOne is the 8-byte value 1 in native byte order, the one thing ever written.
var eventfdOne = func() (b [8]byte) {
	binary.NativeEndian.PutUint64(b[:], 1)
	return
}()

// post adds 1 to the counter. EAGAIN (the counter is at its maximum) means the waiter
// has wake-ups pending already (SPEC §4.5). The write never blocks (O_NONBLOCK), so it
// is a raw system call, without the scheduler hand-off of a blocking one.
func (e *eventfd) post() {
	if e == nil || e.fd < 0 {
		return
	}
	for {
		_, _, errno := unix.RawSyscall(unix.SYS_WRITE, uintptr(e.fd), uintptr(unsafe.Pointer(&eventfdOne[0])), 8)
		if errno != unix.EINTR {
			return
		}
	}
}

// wait sleeps until the eventfd is readable or d has passed, then drains the counter
// (one read takes every pending post, counter mode). It reports nothing: a wake-up is
// only a hint, and the caller re-checks the ring either way. A signal (EINTR) is a
// spurious wake-up like any other.
func (e *eventfd) wait(d time.Duration) {
	if e == nil || e.fd < 0 {
		return
	}
	if d < time.Microsecond {
		d = time.Microsecond
	}
	pfd := [1]unix.PollFd{{Fd: int32(e.fd), Events: unix.POLLIN}}
	ts := unix.NsecToTimespec(int64(d))
	// ppoll rather than poll: arm64 has no poll system call.
	n, err := unix.Ppoll(pfd[:], &ts, nil)
	if err != nil || n == 0 || pfd[0].Revents&unix.POLLIN == 0 {
		return // EINTR, timeout
	}
	e.drain()
}

// drain reads the counter back to 0; EAGAIN (already 0) is fine.
func (e *eventfd) drain() {
	var buf [8]byte
	unix.RawSyscall(unix.SYS_READ, uintptr(e.fd), uintptr(unsafe.Pointer(&buf[0])), 8)
}

func (e *eventfd) close() {
	if e.fd >= 0 {
		unix.Close(e.fd)
		e.fd = -1
	}
}

// checkEventfd checks that fd, received with the welcome, is what SPEC §2.4 says: an
// eventfd (its /proc/self/fd link is anon_inode:[eventfd]) opened O_NONBLOCK. A blocking
// one could block a poster forever, and the client must not make it non-blocking itself:
// the flag is the daemon's too.
func checkEventfd(fd int, what string) error {
	target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return protocolErrorf("cannot tell what the %s descriptor is: %v", what, err)
	}
	if target != "anon_inode:[eventfd]" {
		return protocolErrorf("the %s descriptor is %q, want an eventfd (anon_inode:[eventfd])", what, target)
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return protocolErrorf("fcntl(F_GETFL) on the %s eventfd: %v", what, err)
	}
	if flags&unix.O_NONBLOCK == 0 {
		return protocolErrorf("the %s eventfd is not O_NONBLOCK (SPEC §2.4)", what)
	}
	return nil
}

// unhookedSleep bounds a waiter's first sleep on a context that can be cancelled. A
// cancellation has to post the eventfd to end a sleep at once, which takes a hook on the
// context (context.AfterFunc: a few allocations, and the parent context's lock on a
// context shared by many goroutines). Most waits end within a millisecond, so the hook is
// only set for the sleeps after the first; a cancellation during the first sleep is
// noticed when it ends.
const unhookedSleep = time.Millisecond

// ctxWait is what a waiter checks about its caller's context before and after each sleep
// (the stop function of waitFor): the context's end, its deadline as the longest sleep,
// and the hook that makes a cancellation post the eventfd slept on.
type ctxWait struct {
	ctx    context.Context
	s      *session
	reader bool // the eventfd slept on: pd (the response reader) or rs (a writer)
	sleeps int
	unhook func() bool
}

func (w *ctxWait) check() (time.Duration, error) {
	if w.ctx.Done() == nil {
		return 0, nil
	}
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	var limit time.Duration
	if dl, ok := w.ctx.Deadline(); ok {
		if limit = time.Until(dl); limit <= 0 {
			return 0, context.DeadlineExceeded
		}
	}
	if w.unhook == nil {
		if w.sleeps == 0 {
			w.sleeps++
			if limit == 0 || limit > unhookedSleep {
				limit = unhookedSleep
			}
			return limit, nil
		}
		// The method values are made here, not before: made earlier they would be
		// allocated on every call, hook or not.
		if w.reader {
			w.unhook = context.AfterFunc(w.ctx, w.s.wakeReader)
		} else {
			w.unhook = context.AfterFunc(w.ctx, w.s.wakeWriter)
		}
	}
	return limit, nil
}

// done removes the hook, if one was set.
func (w *ctxWait) done() {
	if w.unhook != nil {
		w.unhook()
	}
}
