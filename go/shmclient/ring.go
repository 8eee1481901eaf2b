package shmclient

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Record header (SPEC §4.3).
const (
	recordHeaderSize = 24
	recordAlign      = 64

	kindPad      = 0
	kindRequest  = 1
	kindResponse = 2
)

func align64(n uint64) uint64 { return (n + recordAlign - 1) &^ (recordAlign - 1) }

type recordHeader struct {
	Len       uint32
	Kind      uint32
	RequestID uint64
	DescLen   uint32
}

func putRecordHeader(b []byte, h recordHeader) {
	binary.LittleEndian.PutUint32(b[0:], h.Len)
	binary.LittleEndian.PutUint32(b[4:], h.Kind)
	binary.LittleEndian.PutUint64(b[8:], h.RequestID)
	binary.LittleEndian.PutUint32(b[16:], h.DescLen)
	binary.LittleEndian.PutUint32(b[20:], 0)
}

func getRecordHeader(b []byte) recordHeader {
	return recordHeader{
		Len:       binary.LittleEndian.Uint32(b[0:]),
		Kind:      binary.LittleEndian.Uint32(b[4:]),
		RequestID: binary.LittleEndian.Uint64(b[8:]),
		DescLen:   binary.LittleEndian.Uint32(b[16:]),
	}
}

// ringMem is one ring as mapped: its buffer and pointers to its control words.
// The control words are only ever touched through sync/atomic (SPEC §4.6).
type ringMem struct {
	buf             []byte
	capacity        uint64
	tail            *uint64
	producerWaiting *uint32
	head            *uint64
	consumerWaiting *uint32
}

// waitFor implements the waiter of SPEC §4.5: it returns once *counter differs from
// seen, or with stop's error. waiting is the caller's *_waiting word, efd the eventfd
// the other side posts. stop is called before each sleep (and after it, unless the
// counter moved); it returns the longest the caller may still wait (0: no limit) or why
// to give up. One goroutine at a time waits on a given eventfd (see the callers).
func waitFor(counter *uint64, seen uint64, waiting *uint32, efd *eventfd, spin time.Duration, stop func() (time.Duration, error)) error {
	for {
		if spin > 0 {
			start := time.Now()
			for i := 0; ; i++ {
				if atomic.LoadUint64(counter) != seen {
					return nil
				}
				if i&63 == 63 {
					if time.Since(start) >= spin {
						break
					}
					// The goroutine this reader would wake may be queued behind it on the
					// same P: give it the processor now and then.
					runtime.Gosched()
				}
			}
		}
		// Dekker pattern: the atomic store is sequentially consistent (a full barrier on
		// every Go platform), so the poster either sees our 1 or we see its new counter.
		atomic.StoreUint32(waiting, 1)
		if atomic.LoadUint64(counter) != seen {
			atomic.StoreUint32(waiting, 0)
			return nil
		}
		slice := waitSlice
		limit, err := stop()
		if err != nil {
			atomic.StoreUint32(waiting, 0)
			return err
		}
		if limit > 0 && limit < slice {
			slice = limit
		}
		efd.wait(slice)
		atomic.StoreUint32(waiting, 0)
		if atomic.LoadUint64(counter) != seen {
			return nil
		}
		if _, err := stop(); err != nil {
			return err
		}
	}
}

// post implements the poster of SPEC §4.5, called right after storing tail or head.
// That store was a sync/atomic (sequentially consistent) store, which is the barrier.
func post(waiting *uint32, efd *eventfd) {
	if atomic.LoadUint32(waiting) == 1 {
		efd.post()
	}
}

// producer writes records into a ring. Space is reserved in ring order (by one writer at
// a time), filled concurrently, and published in ring order: tail only advances over a
// prefix of filled reservations (SPEC §4.7).
type producer struct {
	r     ringMem
	data  *eventfd // posted after publishing
	space *eventfd // waited on for space
	spin  time.Duration

	// mu guards the reservation list and is never held while waiting, so a caller
	// publishing its reservation is never stuck behind a writer waiting for space.
	mu        sync.Mutex
	reserved  uint64 // end of reserved space
	published uint64 // tail as last stored
	pending   []reservation
}

type reservation struct {
	pos, len uint64
	filled   bool
}

// reserve reserves n bytes (a multiple of 64, at most the capacity) and returns the
// position. Only one goroutine may call it at a time (the client's writer lock). When
// the record does not fit before the end of the buffer a PAD covering the rest is
// published first, so the record starts at buffer offset 0 (SPEC §4.3).
func (p *producer) reserve(n uint64, stop func() (time.Duration, error)) (uint64, error) {
	if n > p.r.capacity || n%recordAlign != 0 || n == 0 {
		return 0, fmt.Errorf("%w: record of %d bytes for a ring of %d", ErrTooLarge, n, p.r.capacity)
	}
	for {
		p.mu.Lock()
		pos := p.reserved
		p.mu.Unlock()
		off := pos % p.r.capacity
		size := n
		if rest := p.r.capacity - off; rest < n {
			size = rest
		}
		if err := p.waitSpace(pos+size, stop); err != nil {
			return 0, err
		}
		p.mu.Lock()
		if size == n {
			p.pending = append(p.pending, reservation{pos: pos, len: n})
			p.reserved = pos + n
			p.mu.Unlock()
			return pos, nil
		}
		putRecordHeader(p.r.buf[off:], recordHeader{Len: uint32(size), Kind: kindPad})
		p.pending = append(p.pending, reservation{pos: pos, len: size, filled: true})
		p.reserved = pos + size
		p.publishLocked()
		p.mu.Unlock()
	}
}

// waitSpace waits until the consumer has released enough that end-capacity <= head.
func (p *producer) waitSpace(end uint64, stop func() (time.Duration, error)) error {
	for {
		head := atomic.LoadUint64(p.r.head)
		if end <= head+p.r.capacity {
			return nil
		}
		if err := waitFor(p.r.head, head, p.r.producerWaiting, p.space, p.spin, stop); err != nil {
			return err
		}
	}
}

// slice returns the bytes of a reservation.
func (p *producer) slice(pos, n uint64) []byte {
	off := pos % p.r.capacity
	return p.r.buf[off : off+n : off+n]
}

// commit marks the reservation at pos filled (or, with abandon, turns it into a PAD of
// the same length) and publishes whatever prefix is now complete.
func (p *producer) commit(pos uint64, abandon bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range p.pending {
		r := &p.pending[i]
		if r.pos != pos {
			continue
		}
		if abandon {
			putRecordHeader(p.slice(r.pos, r.len), recordHeader{Len: uint32(r.len), Kind: kindPad})
		}
		r.filled = true
		break
	}
	p.publishLocked()
}

func (p *producer) publishLocked() {
	n := 0
	tail := p.published
	for n < len(p.pending) && p.pending[n].filled {
		tail = p.pending[n].pos + p.pending[n].len
		n++
	}
	if n == 0 {
		return
	}
	p.pending = append(p.pending[:0], p.pending[n:]...)
	p.published = tail
	atomic.StoreUint64(p.r.tail, tail)
	post(p.r.consumerWaiting, p.data)
}

// consumer reads records from a ring and releases them in any order (SPEC §4.7).
type consumer struct {
	r     ringMem
	data  *eventfd // waited on for records
	space *eventfd // posted after releasing
	spin  time.Duration

	readPos  uint64 // reader goroutine only
	lastTail uint64 // reader goroutine only

	mu      sync.Mutex
	head    uint64
	held    []heldRecord // records read and not yet released, in ring order
	heldSeq uint64       // sequence number of held[0]
	nextSeq uint64
}

type heldRecord struct {
	end  uint64
	done bool
}

// record is one record read from the ring; body aliases shared memory.
type record struct {
	seq  uint64
	hdr  recordHeader
	body []byte // the whole record, header included
}

// next returns the next record, waiting for one if needed. Every field read from shared
// memory is validated before use; a violation is returned as ErrProtocol (SPEC §4.8).
// PAD records are released at once and skipped.
func (c *consumer) next(allowedKind uint32, stop func() (time.Duration, error)) (record, error) {
	for {
		tail := atomic.LoadUint64(c.r.tail)
		c.mu.Lock()
		head := c.head
		c.mu.Unlock()
		switch {
		case tail < c.lastTail:
			return record{}, protocolErrorf("ring tail moved backwards from %d to %d", c.lastTail, tail)
		case tail%recordAlign != 0:
			return record{}, protocolErrorf("ring tail %d is not a multiple of 64", tail)
		case tail > head+c.r.capacity:
			return record{}, protocolErrorf("ring tail %d is more than the capacity %d past head %d", tail, c.r.capacity, head)
		}
		c.lastTail = tail
		if c.readPos == tail {
			if err := waitFor(c.r.tail, tail, c.r.consumerWaiting, c.data, c.spin, stop); err != nil {
				return record{}, err
			}
			continue
		}
		off := c.readPos % c.r.capacity
		h := getRecordHeader(c.r.buf[off:])
		switch {
		case h.Len%recordAlign != 0 || h.Len < recordAlign:
			return record{}, protocolErrorf("record at %d has length %d (not a multiple of 64 of at least 64)", c.readPos, h.Len)
		case uint64(h.Len) > tail-c.readPos:
			return record{}, protocolErrorf("record at %d of %d bytes runs past the published tail %d", c.readPos, h.Len, tail)
		case off+uint64(h.Len) > c.r.capacity:
			return record{}, protocolErrorf("record at %d of %d bytes crosses the end of the ring", c.readPos, h.Len)
		case h.Kind != kindPad && h.Kind != allowedKind:
			return record{}, protocolErrorf("record at %d has kind %d", c.readPos, h.Kind)
		case uint64(h.DescLen) > uint64(h.Len)-recordHeaderSize:
			return record{}, protocolErrorf("record at %d has descriptor length %d beyond its length %d", c.readPos, h.DescLen, h.Len)
		}
		c.readPos += uint64(h.Len)
		c.mu.Lock()
		seq := c.nextSeq
		c.nextSeq++
		c.held = append(c.held, heldRecord{end: c.readPos})
		c.mu.Unlock()
		if h.Kind == kindPad {
			c.release(seq)
			continue
		}
		return record{seq: seq, hdr: h, body: c.r.buf[off : off+uint64(h.Len) : off+uint64(h.Len)]}, nil
	}
}

// release marks a record done and advances head over the longest released prefix.
func (c *consumer) release(seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := seq - c.heldSeq
	if seq < c.heldSeq || i >= uint64(len(c.held)) || c.held[i].done {
		panic(fmt.Sprintf("shmclient: record %d released twice", seq))
	}
	c.held[i].done = true
	n := 0
	for n < len(c.held) && c.held[n].done {
		c.head = c.held[n].end
		n++
	}
	if n == 0 {
		return
	}
	c.held = append(c.held[:0], c.held[n:]...)
	c.heldSeq += uint64(n)
	atomic.StoreUint64(c.r.head, c.head)
	post(c.r.producerWaiting, c.space)
}
