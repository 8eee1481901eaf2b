package shmclient

/*
#cgo linux LDFLAGS: -lpthread
#define _GNU_SOURCE // sem_clockwait
#include <errno.h>
#include <semaphore.h>
#include <stdlib.h>
#include <time.h>

static sem_t *td_sem_open(const char *name, int *err) {
	sem_t *s = sem_open(name, 0);
	if (s == SEM_FAILED) {
		*err = errno;
		return NULL;
	}
	return s;
}

// Returns 0 when the semaphore was taken, else errno (ETIMEDOUT, EINTR, ...).
// The monotonic clock keeps a wall-clock step from turning a 10 ms wait into hours.
static int td_sem_timedwait(sem_t *s, long long ns) {
	struct timespec ts;
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
	clock_gettime(CLOCK_MONOTONIC, &ts);
#define TD_WAIT(s, ts) sem_clockwait(s, CLOCK_MONOTONIC, ts)
#else
	clock_gettime(CLOCK_REALTIME, &ts);
#define TD_WAIT(s, ts) sem_timedwait(s, ts)
#endif
	ts.tv_sec += ns / 1000000000LL;
	ts.tv_nsec += ns % 1000000000LL;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	if (TD_WAIT(s, &ts) == 0) {
		return 0;
	}
	return errno;
}

static int td_sem_post(sem_t *s) {
	return sem_post(s) == 0 ? 0 : errno;
}

static int td_sem_close(sem_t *s) {
	return sem_close(s) == 0 ? 0 : errno;
}
*/
import "C"

import (
	"fmt"
	"syscall"
	"time"
	"unsafe"
)

// semaphore is a named POSIX semaphore opened (never created) by the client; the daemon
// creates and unlinks it. cgo is used because glibc's sem_t layout is not an ABI promise.
type semaphore struct {
	name string
	s    *C.sem_t
}

func openSemaphore(name string) (*semaphore, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var errno C.int
	s := C.td_sem_open(cname, &errno)
	if s == nil {
		return nil, fmt.Errorf("sem_open %s: %w", name, syscall.Errno(errno))
	}
	return &semaphore{name: name, s: s}, nil
}

// wait blocks for at most d (holding an OS thread) and reports whether it took a post.
// Timeouts and signals return false: callers re-check the ring either way (SPEC §4.5).
func (s *semaphore) wait(d time.Duration) bool {
	return C.td_sem_timedwait(s.s, C.longlong(d.Nanoseconds())) == 0
}

func (s *semaphore) post() {
	if s == nil {
		return // only in tests that read a ring image without a peer
	}
	// sem_post only fails on EOVERFLOW (counter at SEM_VALUE_MAX), which means the
	// waiter already has more wake-ups than it needs.
	C.td_sem_post(s.s)
}

func (s *semaphore) close() {
	if s != nil && s.s != nil {
		C.td_sem_close(s.s)
		s.s = nil
	}
}
