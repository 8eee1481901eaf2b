// Package shmtest creates what the daemon creates for a session (a memfd segment and
// eventfds), for the tests of shmclient, which stand in for the daemon side of a session.
// shmclient itself never creates these objects: it only receives them. Plain system
// calls, no cgo.
package shmtest

import (
	"fmt"
	"syscall"
	"unsafe"
)

// Flags of memfd_create(2), eventfd(2) and fcntl(2) seals (the same on every Linux
// architecture).
const (
	mfdCloexec      = 0x1
	mfdAllowSealing = 0x2
	efdCloexec      = syscall.O_CLOEXEC
	efdNonblock     = syscall.O_NONBLOCK
	fAddSeals       = 1033
	fSealSeal       = 0x1
	fSealShrink     = 0x2
	fSealGrow       = 0x4
)

// Memfd creates a memfd of size bytes holding data at its start, sealed against resizing,
// as the daemon creates a session segment, and returns its descriptor (close-on-exec).
func Memfd(name string, size int64, data []byte) (int, error) {
	cname, err := syscall.BytePtrFromString(name)
	if err != nil {
		return -1, err
	}
	r, _, errno := syscall.Syscall(sysMemfdCreate, uintptr(unsafe.Pointer(cname)), mfdCloexec|mfdAllowSealing, 0)
	if errno != 0 {
		return -1, fmt.Errorf("memfd_create %s: %w", name, errno)
	}
	fd := int(r)
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
	if _, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), fAddSeals, fSealShrink|fSealGrow|fSealSeal); errno != 0 {
		syscall.Close(fd)
		return -1, fmt.Errorf("sealing memfd %s: %w", name, errno)
	}
	return fd, nil
}

// Eventfd creates an eventfd in counter mode, non-blocking and close-on-exec, as the
// daemon creates a session's wake-ups (SPEC §4.5).
func Eventfd() (int, error) {
	return eventfd(efdCloexec | efdNonblock)
}

// BlockingEventfd creates an eventfd without O_NONBLOCK, which the client must refuse.
func BlockingEventfd() (int, error) {
	return eventfd(efdCloexec)
}

func eventfd(flags uintptr) (int, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_EVENTFD2, 0, flags, 0)
	if errno != 0 {
		return -1, fmt.Errorf("eventfd2: %w", errno)
	}
	return int(r), nil
}

// Eventfds creates the four eventfds of a session (rd, rs, pd, ps).
func Eventfds() ([4]int, error) {
	var fds [4]int
	for i := range fds {
		fd, err := Eventfd()
		if err != nil {
			for _, f := range fds[:i] {
				syscall.Close(f)
			}
			return fds, err
		}
		fds[i] = fd
	}
	return fds, nil
}
