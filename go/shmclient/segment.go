package shmclient

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// Segment header layout (SPEC §4.1).
const (
	headerSize          = 4096
	layoutVersion       = 1
	offLayoutVersion    = 8
	offHeaderSize       = 12
	offSegmentSize      = 16
	offReqRingOffset    = 24
	offReqRingCapacity  = 32
	offRespRingOffset   = 40
	offRespRingCapacity = 48
	offReqControl       = 128
	offRespControl      = 256
)

var segmentMagic = [8]byte{'T', 'E', 'N', 'S', 'O', 'R', 'D', 0}

// segment is the session's mapping plus its eventfds. Both live until the last reference
// is dropped: the client holds one until the session ends, and every reservation,
// response view and goroutine reading the response ring holds one, so nothing unmaps
// memory a caller still reads, and no eventfd is closed (its number free for reuse by an
// unrelated descriptor) while a goroutine may still post it or sleep on it.
type segment struct {
	mem  []byte
	efds [numEventfds]eventfd
	refs atomic.Int64
}

// eventfdNames name the welcome's descriptors 1-4 in errors.
var eventfdNames = [numEventfds]string{"rd (request-data)", "rs (request-space)", "pd (response-data)", "ps (response-space)"}

// attachSegment takes the five descriptors of a welcome (SPEC §2.4): it checks that
// descriptors 1-4 are eventfds, maps the segment (descriptor 0) and closes it, and keeps
// the eventfds in the segment, which closes them when it is released. It owns every
// descriptor from the call on: on failure it has closed them all.
func attachSegment(fds []int, size uint64) (*segment, error) {
	if len(fds) != 1+numEventfds {
		closeFDs(fds)
		return nil, protocolErrorf("%d descriptors for a session, want %d", len(fds), 1+numEventfds)
	}
	for i, fd := range fds[1:] {
		if err := checkEventfd(fd, eventfdNames[i]); err != nil {
			closeFDs(fds)
			return nil, err
		}
	}
	s, err := mapSegment(fds[0], size)
	if err != nil {
		closeFDs(fds[1:])
		return nil, err
	}
	for i, fd := range fds[1:] {
		s.efds[i].fd = fd
	}
	return s, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}

// mapSegment maps the session segment read-write: a memfd whose descriptor came with the
// welcome (SCM_RIGHTS) and whose size the daemon sealed, so nobody can shrink it under
// either side. It closes fd on every path, success included: the mapping keeps the
// memory alive, and the segment has no name to reopen it by. The segment it returns has
// no eventfds (attachSegment adds them) and one reference.
func mapSegment(fd int, size uint64) (*segment, error) {
	defer syscall.Close(fd)
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("fstat of the session segment: %w", err)
	}
	if uint64(st.Size) != size {
		return nil, protocolErrorf("the session segment is %d bytes, welcome says %d", st.Size, size)
	}
	if size < headerSize || size > 1<<40 {
		return nil, protocolErrorf("segment size %d out of range", size)
	}
	mem, err := syscall.Mmap(fd, 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap of the session segment: %w", err)
	}
	s := &segment{mem: mem}
	for i := range s.efds {
		s.efds[i].fd = -1
	}
	s.refs.Store(1)
	return s, nil
}

func (s *segment) u32(off int) uint32 { return binary.LittleEndian.Uint32(s.mem[off:]) }
func (s *segment) u64(off int) uint64 { return binary.LittleEndian.Uint64(s.mem[off:]) }

// check validates the header against the welcome (SPEC §4.1). layout_version is read
// atomically because the daemon stores it last to publish the rest of the header.
func (s *segment) check(w *welcomeMsg) error {
	if !bytesEqual(s.mem[:8], segmentMagic[:]) {
		return protocolErrorf("segment magic %q, want %q", s.mem[:8], segmentMagic[:])
	}
	if v := atomic.LoadUint32(s.ptr32(offLayoutVersion)); v != layoutVersion {
		return protocolErrorf("segment layout_version %d, want %d", v, layoutVersion)
	}
	type field struct {
		name      string
		got, want uint64
	}
	for _, f := range []field{
		{"header_size", uint64(s.u32(offHeaderSize)), headerSize},
		{"segment_size", s.u64(offSegmentSize), w.SegmentSize},
		{"segment_size (mapping)", uint64(len(s.mem)), w.SegmentSize},
		{"segment_size (sum)", headerSize + w.RequestRing + w.ResponseRing, w.SegmentSize},
		{"request_ring_offset", s.u64(offReqRingOffset), headerSize},
		{"request_ring_capacity", s.u64(offReqRingCapacity), w.RequestRing},
		{"response_ring_offset", s.u64(offRespRingOffset), headerSize + w.RequestRing},
		{"response_ring_capacity", s.u64(offRespRingCapacity), w.ResponseRing},
	} {
		if f.got != f.want {
			return protocolErrorf("segment header %s is %d, expected %d", f.name, f.got, f.want)
		}
	}
	for _, c := range []uint64{w.RequestRing, w.ResponseRing} {
		if c < minRing || c&(c-1) != 0 {
			return protocolErrorf("ring capacity %d is not a power of two of at least %d", c, minRing)
		}
	}
	return nil
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

func (s *segment) ptr32(off int) *uint32 { return (*uint32)(unsafe.Pointer(&s.mem[off])) }
func (s *segment) ptr64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&s.mem[off])) }

// ring returns the ring whose control block is at ctl and whose buffer is at
// [off, off+capacity); check has validated both.
func (s *segment) ring(ctl int, off, capacity uint64) ringMem {
	return ringMem{
		buf:             s.mem[off : off+capacity : off+capacity],
		capacity:        capacity,
		tail:            s.ptr64(ctl + 0),
		producerWaiting: s.ptr32(ctl + 8),
		head:            s.ptr64(ctl + 64),
		consumerWaiting: s.ptr32(ctl + 72),
	}
}

// acquire takes a reference; it fails once the mapping is gone.
func (s *segment) acquire() bool {
	for {
		n := s.refs.Load()
		if n <= 0 {
			return false
		}
		if s.refs.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// release drops a reference; the last one closes the eventfds and unmaps.
func (s *segment) release() {
	n := s.refs.Add(-1)
	if n > 0 {
		return
	}
	if n < 0 {
		panic("shmclient: segment released more often than acquired")
	}
	for i := range s.efds {
		s.efds[i].close()
	}
	if s.mem != nil {
		syscall.Munmap(s.mem)
		s.mem = nil
	}
}
