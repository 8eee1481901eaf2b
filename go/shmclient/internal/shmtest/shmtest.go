// Package shmtest creates what the daemon creates for a session (a memfd segment and
// eventfds), for the tests of shmclient, which stand in for the daemon side of a session.
// shmclient itself never creates these objects: it only receives them. Plain system
// calls through golang.org/x/sys/unix (pure Go, no cgo).
package shmtest

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Memfd creates a memfd of size bytes holding data at its start, sealed against resizing,
// as the daemon creates a session segment, and returns its descriptor (close-on-exec).
func Memfd(name string, size int64, data []byte) (int, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return -1, fmt.Errorf("memfd_create %s: %w", name, err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("ftruncate memfd %s: %w", name, err)
	}
	if len(data) > 0 {
		if _, err := unix.Pwrite(fd, data, 0); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("writing memfd %s: %w", name, err)
		}
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("sealing memfd %s: %w", name, err)
	}
	return fd, nil
}

// Eventfd creates an eventfd in counter mode, non-blocking and close-on-exec, as the
// daemon creates a session's wake-ups (SPEC §4.5).
func Eventfd() (int, error) {
	return eventfd(unix.EFD_CLOEXEC | unix.EFD_NONBLOCK)
}

// BlockingEventfd creates an eventfd without O_NONBLOCK, which the client must refuse.
func BlockingEventfd() (int, error) {
	return eventfd(unix.EFD_CLOEXEC)
}

func eventfd(flags int) (int, error) {
	fd, err := unix.Eventfd(0, flags)
	if err != nil {
		return -1, fmt.Errorf("eventfd2: %w", err)
	}
	return fd, nil
}

// Eventfds creates the four eventfds of a session (rd, rs, pd, ps).
func Eventfds() ([4]int, error) {
	var fds [4]int
	for i := range fds {
		fd, err := Eventfd()
		if err != nil {
			for _, f := range fds[:i] {
				unix.Close(f)
			}
			return fds, err
		}
		fds[i] = fd
	}
	return fds, nil
}
