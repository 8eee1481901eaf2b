package floor

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
	"golang.org/x/sys/unix"
)

// SpinPingPong measures round trips Go -> Python -> Go on two u64 counters in shared
// memory (a memfd handed to the peer as fd 3), both sides busy-polling, no system call at
// all: the spinning floor. Go stores ping (offset 0), the peer copies it into pong
// (offset 64, its own cache line).
func SpinPingPong(ctx context.Context, peerCmd []string, lim Limits) (*hdrhistogram.Histogram, error) {
	fd, err := unix.MemfdCreate("tdbench-floor-spin", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "floor-spin")
	defer f.Close()
	if err := f.Truncate(4096); err != nil {
		return nil, err
	}
	mem, err := syscall.Mmap(fd, 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return nil, err
	}
	defer syscall.Munmap(mem)
	ping := (*uint64)(unsafe.Pointer(&mem[0]))
	pong := (*uint64)(unsafe.Pointer(&mem[64]))
	argv := append(append([]string{}, peerCmd...), "spin", "--idle", "1")
	p, err := startPeer(ctx, argv, []*os.File{f})
	if err != nil {
		return nil, err
	}
	defer p.stop()
	var v uint64
	round := func() (time.Duration, error) {
		v++
		t0 := time.Now()
		atomic.StoreUint64(ping, v)
		for n := 0; atomic.LoadUint64(pong) != v; n++ {
			if n&0xffff == 0xffff && time.Since(t0) > time.Second {
				return 0, fmt.Errorf("spin ping-pong round %d: the peer did not answer in 1 s", v)
			}
		}
		return time.Since(t0), nil
	}
	return pingPong(lim, round)
}
