// Package shmtest creates what the daemon creates (named semaphores, memfds) for the
// tests of shmclient, which stand in for the daemon side of a session. It is a package
// of its own because cgo is not allowed in _test.go files, and shmclient itself only
// ever opens these objects.
package shmtest

/*
#cgo linux LDFLAGS: -lpthread
#define _GNU_SOURCE // memfd_create
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdlib.h>
#include <sys/mman.h>

static int td_sem_create(const char *name) {
	sem_t *s = sem_open(name, O_CREAT | O_EXCL, 0600, 0);
	if (s == SEM_FAILED) {
		return errno;
	}
	sem_close(s);
	return 0;
}

static int td_sem_unlink(const char *name) {
	return sem_unlink(name) == 0 ? 0 : errno;
}

static int td_memfd_create(const char *name, int *err) {
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0) {
		*err = errno;
	}
	return fd;
}
*/
import "C"

import (
	"fmt"
	"syscall"
	"unsafe"
)

// CreateSemaphore creates the named semaphore with value 0, like the daemon does at the
// handshake; the caller opens it with the code under test and unlinks it.
func CreateSemaphore(name string) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	if e := C.td_sem_create(cname); e != 0 {
		return fmt.Errorf("sem_open(O_CREAT) %s: %w", name, syscall.Errno(e))
	}
	return nil
}

// UnlinkSemaphore removes the name; handles already open stay usable.
func UnlinkSemaphore(name string) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	if e := C.td_sem_unlink(cname); e != 0 {
		return fmt.Errorf("sem_unlink %s: %w", name, syscall.Errno(e))
	}
	return nil
}

// Memfd creates a memfd of size bytes holding data at its start, as the daemon creates a
// session segment, and returns its descriptor (close-on-exec).
func Memfd(name string, size int64, data []byte) (int, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var errno C.int
	fd := int(C.td_memfd_create(cname, &errno))
	if fd < 0 {
		return -1, fmt.Errorf("memfd_create %s: %w", name, syscall.Errno(errno))
	}
	if err := syscall.Ftruncate(fd, size); err != nil {
		syscall.Close(fd)
		return -1, fmt.Errorf("ftruncate memfd %s: %w", name, err)
	}
	if len(data) > 0 {
		if _, err := syscall.Pwrite(fd, data, 0); err != nil {
			syscall.Close(fd)
			return -1, fmt.Errorf("writing memfd %s: %w", name, err)
		}
	}
	return fd, nil
}
