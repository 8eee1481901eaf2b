// Package floor measures what no transport between a Go and a Python process can beat:
// a semaphore ping-pong (the blocking floor), a busy-poll ping-pong on shared memory (the
// spinning floor), and memcpy bandwidth.
package floor

/*
#cgo linux LDFLAGS: -lpthread
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdlib.h>
#include <time.h>

static sem_t *fl_sem_create(const char *name, int *err) {
	sem_t *s = sem_open(name, O_CREAT | O_EXCL, 0600, 0);
	if (s == SEM_FAILED) { *err = errno; return 0; }
	return s;
}

// 0 when taken, else errno (ETIMEDOUT after ns nanoseconds).
static int fl_sem_timedwait(sem_t *s, long long ns) {
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ns / 1000000000LL;
	ts.tv_nsec += ns % 1000000000LL;
	if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
	while (sem_timedwait(s, &ts) != 0) {
		if (errno != EINTR) return errno;
	}
	return 0;
}

static int fl_sem_post(sem_t *s) { return sem_post(s) == 0 ? 0 : errno; }
*/
import "C"

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
	"unsafe"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Limits bounds a floor measurement by count and time.
type Limits struct {
	Warmup   int
	MaxIters int
	Duration time.Duration
	// Gap is an idle pause (time.Sleep) before each semaphore round, so both processes have
	// gone to sleep and their CPUs idle when the round starts, as between real requests.
	Gap time.Duration
}

// peer is the Python side (bench/servers/floor_peer.py), started by the caller's command.
type peer struct {
	cmd    *exec.Cmd
	stderr strings.Builder
}

func startPeer(ctx context.Context, argv []string) (*peer, error) {
	p := &peer{cmd: exec.CommandContext(ctx, argv[0], argv[1:]...)}
	p.cmd.Stderr = &p.stderr
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	ready := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() && sc.Text() == "READY" {
			ready <- nil
			return
		}
		ready <- fmt.Errorf("floor peer did not start: %s", strings.TrimSpace(p.stderr.String()))
	}()
	select {
	case err := <-ready:
		if err != nil {
			p.stop()
			return nil, err
		}
		return p, nil
	case <-time.After(30 * time.Second):
		p.stop()
		return nil, fmt.Errorf("floor peer did not report READY in 30 s")
	}
}

// stop ends the peer (it would also exit by itself once idle).
func (p *peer) stop() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = p.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			_ = p.cmd.Process.Kill()
			<-done
		}
	}
}

type sem struct{ s *C.sem_t }

func createSem(name string) (*sem, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var e C.int
	s := C.fl_sem_create(cname, &e)
	if s == nil {
		return nil, fmt.Errorf("sem_open(%s): %w", name, syscall.Errno(e))
	}
	return &sem{s}, nil
}

func unlinkSem(name string) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	C.sem_unlink(cname)
}

func (s *sem) post() error {
	if e := C.fl_sem_post(s.s); e != 0 {
		return syscall.Errno(e)
	}
	return nil
}

func (s *sem) wait(d time.Duration) error {
	if e := C.fl_sem_timedwait(s.s, C.longlong(d)); e != 0 {
		return syscall.Errno(e)
	}
	return nil
}

func (s *sem) close() { C.sem_close(s.s) }

// SemPingPong measures round trips Go -> Python -> Go through two named POSIX semaphores
// (cgo sem_post/sem_timedwait here, posix_ipc in the peer): the cost of waking a blocked
// process and being woken back, with no payload. peerCmd is the floor_peer.py command line
// without its mode arguments.
func SemPingPong(ctx context.Context, peerCmd []string, lim Limits) (*hdrhistogram.Histogram, error) {
	base := fmt.Sprintf("/tdbench-%d-floor", os.Getpid())
	aName, bName := base+"-a", base+"-b"
	unlinkSem(aName)
	unlinkSem(bName)
	a, err := createSem(aName)
	if err != nil {
		return nil, err
	}
	defer a.close()
	b, err := createSem(bName)
	if err != nil {
		unlinkSem(aName)
		return nil, err
	}
	defer b.close()
	argv := append(append([]string{}, peerCmd...), "sem", aName, bName, "--idle", "1")
	p, err := startPeer(ctx, argv)
	// Both ends have the semaphores open (or the peer failed): the names can go.
	unlinkSem(aName)
	unlinkSem(bName)
	if err != nil {
		return nil, err
	}
	defer p.stop()
	round := func() (time.Duration, error) {
		if lim.Gap > 0 {
			time.Sleep(lim.Gap)
		}
		t0 := time.Now()
		if err := a.post(); err != nil {
			return 0, err
		}
		if err := b.wait(time.Second); err != nil {
			return 0, fmt.Errorf("semaphore ping-pong: the peer did not answer in 1 s: %w", err)
		}
		return time.Since(t0), nil
	}
	return pingPong(lim, round)
}

func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(1, int64(10*time.Minute), 3) }

// pingPong warms up (lim.Warmup rounds, at most 5 s), then records rounds until
// lim.MaxIters or lim.Duration.
func pingPong(lim Limits, round func() (time.Duration, error)) (*hdrhistogram.Histogram, error) {
	start := time.Now()
	for i := 0; i < lim.Warmup && time.Since(start) < 5*time.Second; i++ {
		if _, err := round(); err != nil {
			return nil, err
		}
	}
	h := newHist()
	start = time.Now()
	for i := 0; i < lim.MaxIters && time.Since(start) < lim.Duration; i++ {
		d, err := round()
		if err != nil {
			return nil, err
		}
		_ = h.RecordValue(int64(d))
	}
	return h, nil
}
