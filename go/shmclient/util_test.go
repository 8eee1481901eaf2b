package shmclient

import (
	"strings"
	"unsafe"
)

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// shmPath maps a shm_open name to its file: glibc's shm_open is open(2) under /dev/shm.
func shmPath(name string) string {
	return "/dev/shm/" + strings.TrimPrefix(name, "/")
}
