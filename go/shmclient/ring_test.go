package shmclient

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"math/bits"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tensord/tensord/go/shmclient/internal/shmtest"
)

func randomHex(t testing.TB) string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// testSession is both ends of one request ring over a real memfd segment and real
// eventfds, created the way the daemon creates them (SPEC §3, §4.1, §4.5).
type testSession struct {
	seg  *segment
	prod *producer
	cons *consumer
}

// newSegment makes a session segment and its eventfds as the daemon does and attaches
// them as the client does.
func newSegment(t testing.TB, reqCap, respCap uint64) *segment {
	t.Helper()
	size := headerSize + reqCap + respCap
	fd, err := shmtest.Memfd("tensord-test-"+randomHex(t), int64(size), segmentHeader(reqCap, respCap))
	if err != nil {
		t.Fatal(err)
	}
	efds, err := shmtest.Eventfds()
	if err != nil {
		syscall.Close(fd)
		t.Fatal(err)
	}
	seg, err := attachSegment([]int{fd, efds[0], efds[1], efds[2], efds[3]}, size) // takes the fds, as from a welcome
	if err != nil {
		t.Fatal(err)
	}
	if err := seg.check(&welcomeMsg{SegmentSize: size, RequestRing: reqCap, ResponseRing: respCap}); err != nil {
		seg.release()
		t.Fatal(err)
	}
	return seg
}

func newTestSession(t *testing.T, capacity uint64, spin time.Duration) *testSession {
	t.Helper()
	seg := newSegment(t, capacity, capacity)
	t.Cleanup(seg.release)
	r := seg.ring(offReqControl, headerSize, capacity)
	// Both ends in one process share the descriptors, as two processes share the
	// eventfds themselves.
	data, space := &seg.efds[efdReqData], &seg.efds[efdReqSpace]
	return &testSession{
		seg:  seg,
		prod: &producer{r: r, data: data, space: space, spin: spin},
		cons: &consumer{r: r, data: data, space: space, spin: spin},
	}
}

// segmentHeader is the header the daemon writes into a new segment (SPEC §4.1).
func segmentHeader(reqCap, respCap uint64) []byte {
	hdr := make([]byte, headerSize)
	copy(hdr, segmentMagic[:])
	binary.LittleEndian.PutUint32(hdr[offLayoutVersion:], layoutVersion)
	binary.LittleEndian.PutUint32(hdr[offHeaderSize:], headerSize)
	binary.LittleEndian.PutUint64(hdr[offSegmentSize:], headerSize+reqCap+respCap)
	binary.LittleEndian.PutUint64(hdr[offReqRingOffset:], headerSize)
	binary.LittleEndian.PutUint64(hdr[offReqRingCapacity:], reqCap)
	binary.LittleEndian.PutUint64(hdr[offRespRingOffset:], headerSize+reqCap)
	binary.LittleEndian.PutUint64(hdr[offRespRingCapacity:], respCap)
	return hdr
}

func noStop() (time.Duration, error) { return 0, nil }

var errStopped = errors.New("stopped")

func stopAfter(d time.Duration) func() (time.Duration, error) {
	deadline := time.Now().Add(d)
	return func() (time.Duration, error) {
		left := time.Until(deadline)
		if left <= 0 {
			return 0, errStopped
		}
		return left, nil
	}
}

// write reserves, fills and commits one REQUEST record whose payload is n bytes of seed.
func (s *testSession) write(t *testing.T, id uint64, n int) uint64 {
	t.Helper()
	size := align64(uint64(recordHeaderSize + n))
	pos, err := s.prod.reserve(size, stopAfter(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	s.fill(pos, size, id, n)
	s.prod.commit(pos, false)
	return pos
}

func (s *testSession) fill(pos, size, id uint64, n int) {
	rec := s.prod.slice(pos, size)
	putRecordHeader(rec, recordHeader{Len: uint32(size), Kind: kindRequest, RequestID: id, DescLen: uint32(n)})
	for i := 0; i < n; i++ {
		rec[recordHeaderSize+i] = byte(id + uint64(i))
	}
}

func (s *testSession) read(t *testing.T) (record, uint64) {
	t.Helper()
	rec, err := s.cons.next(kindRequest, stopAfter(5*time.Second))
	if err != nil {
		t.Fatalf("%v: head=%d tail=%d readPos=%d held=%d reserved=%d pw=%d cw=%d", err, *s.prod.r.head, *s.prod.r.tail, s.cons.readPos, len(s.cons.held), s.prod.reserved, *s.prod.r.producerWaiting, *s.prod.r.consumerWaiting)
	}
	for i := 0; i < int(rec.hdr.DescLen); i++ {
		if rec.body[recordHeaderSize+i] != byte(rec.hdr.RequestID+uint64(i)) {
			t.Fatalf("record %d: payload byte %d corrupt", rec.hdr.RequestID, i)
		}
	}
	return rec, s.cons.readPos - uint64(rec.hdr.Len)
}

func TestRingWrapWithPad(t *testing.T) {
	const capacity = 65536
	s := newTestSession(t, capacity, 0)
	// 60 KiB first, released, so the next 8 KiB record cannot fit before the end.
	s.write(t, 1, 60*1024-recordHeaderSize)
	rec, _ := s.read(t)
	s.cons.release(rec.seq)

	pos := s.write(t, 2, 8*1024-recordHeaderSize)
	if pos%capacity != 0 {
		t.Fatalf("record after the PAD starts at buffer offset %d, want 0", pos%capacity)
	}
	if pos != capacity {
		t.Fatalf("record position %d, want %d (PAD covered the rest)", pos, capacity)
	}
	pad := getRecordHeader(s.prod.r.buf[60*1024:])
	if pad != (recordHeader{Len: 4 * 1024, Kind: kindPad}) {
		t.Fatalf("PAD header %+v", pad)
	}
	rec, rpos := s.read(t)
	if rec.hdr.RequestID != 2 || rpos != capacity {
		t.Fatalf("read id %d at %d, want id 2 at %d", rec.hdr.RequestID, rpos, capacity)
	}
	s.cons.release(rec.seq)
	if h := *s.prod.r.head; h != capacity+8*1024 {
		t.Fatalf("head %d after releasing everything, want %d", h, capacity+8*1024)
	}
}

func TestRingFullRecordAfterPad(t *testing.T) {
	// A record of exactly the capacity fits once everything before it is released, even
	// when it must be preceded by a PAD (SPEC §4.3).
	const capacity = 65536
	s := newTestSession(t, capacity, 0)
	s.write(t, 1, 100)
	rec, _ := s.read(t)
	s.cons.release(rec.seq)

	done := make(chan uint64)
	go func() {
		pos, err := s.prod.reserve(capacity, stopAfter(5*time.Second))
		if err != nil {
			t.Error(err)
		}
		s.fill(pos, capacity, 2, capacity-recordHeaderSize)
		s.prod.commit(pos, false)
		done <- pos
	}()
	rec, rpos := s.read(t) // the reader must consume the PAD for the writer to proceed
	if rec.hdr.RequestID != 2 || rpos != capacity {
		t.Fatalf("read id %d at %d", rec.hdr.RequestID, rpos)
	}
	if pos := <-done; pos != capacity {
		t.Fatalf("reserved at %d", pos)
	}
	s.cons.release(rec.seq)
}

func TestRingOutOfOrderRelease(t *testing.T) {
	s := newTestSession(t, 65536, 0)
	var ends []uint64
	for id := uint64(1); id <= 4; id++ {
		s.write(t, id, 1000)
		ends = append(ends, *s.prod.r.tail)
	}
	var recs []record
	for i := 0; i < 4; i++ {
		r, _ := s.read(t)
		recs = append(recs, r)
	}
	head := func() uint64 { return *s.prod.r.head }
	s.cons.release(recs[1].seq)
	s.cons.release(recs[3].seq)
	if head() != 0 {
		t.Fatalf("head moved to %d while record 0 is held", head())
	}
	s.cons.release(recs[0].seq)
	if head() != ends[1] {
		t.Fatalf("head %d, want %d (over records 0 and 1)", head(), ends[1])
	}
	s.cons.release(recs[2].seq)
	if head() != ends[3] {
		t.Fatalf("head %d, want %d", head(), ends[3])
	}
}

func TestRingReservationAbandon(t *testing.T) {
	s := newTestSession(t, 65536, 0)
	tail := func() uint64 { return *s.prod.r.tail }
	var pos [3]uint64
	for i := range pos {
		p, err := s.prod.reserve(1024, noStop)
		if err != nil {
			t.Fatal(err)
		}
		pos[i] = p
		s.fill(p, 1024, uint64(i+1), 100)
	}
	s.prod.commit(pos[2], false)
	if tail() != 0 {
		t.Fatalf("tail %d published past unfilled reservations", tail())
	}
	s.prod.commit(pos[0], true) // abandon: becomes a PAD
	if tail() != 1024 {
		t.Fatalf("tail %d, want 1024", tail())
	}
	if h := getRecordHeader(s.prod.slice(pos[0], 1024)); h != (recordHeader{Len: 1024, Kind: kindPad}) {
		t.Fatalf("abandoned reservation header %+v, want a PAD", h)
	}
	s.prod.commit(pos[1], false)
	if tail() != 3072 {
		t.Fatalf("tail %d, want 3072", tail())
	}
	for _, want := range []uint64{2, 3} {
		rec, _ := s.read(t)
		if rec.hdr.RequestID != want {
			t.Fatalf("read id %d, want %d (abandoned record must be skipped)", rec.hdr.RequestID, want)
		}
		s.cons.release(rec.seq)
	}
}

func TestRingWaitForSpaceStops(t *testing.T) {
	s := newTestSession(t, 65536, 0)
	s.write(t, 1, 65536-recordHeaderSize) // the whole ring, unread
	start := time.Now()
	_, err := s.prod.reserve(64, stopAfter(30*time.Millisecond))
	if !errors.Is(err, errStopped) {
		t.Fatalf("reserve on a full ring: %v, want the stop error", err)
	}
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Fatalf("stop took %v", el)
	}
	if *s.prod.r.tail != 65536 {
		t.Fatal("a failed reservation wrote something")
	}
}

func TestRingTooLarge(t *testing.T) {
	s := newTestSession(t, 65536, 0)
	if _, err := s.prod.reserve(65536+64, noStop); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v, want ErrTooLarge", err)
	}
}

func TestRingCorruption(t *testing.T) {
	for _, tc := range []struct {
		name string
		hdr  recordHeader
		tail uint64
	}{
		{"tail not aligned", recordHeader{Len: 64, Kind: kindRequest}, 65},
		{"tail past capacity", recordHeader{Len: 64, Kind: kindRequest}, 65536 + 64},
		{"short record", recordHeader{Len: 32, Kind: kindRequest}, 64},
		{"unaligned length", recordHeader{Len: 100, Kind: kindRequest}, 128},
		{"past tail", recordHeader{Len: 128, Kind: kindRequest}, 64},
		{"bad kind", recordHeader{Len: 64, Kind: 7}, 64},
		{"wrong ring kind", recordHeader{Len: 64, Kind: kindResponse}, 64},
		{"desc too long", recordHeader{Len: 64, Kind: kindRequest, DescLen: 41}, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestSession(t, 65536, 0)
			putRecordHeader(s.prod.r.buf, tc.hdr)
			*s.prod.r.tail = tc.tail
			_, err := s.cons.next(kindRequest, stopAfter(time.Second))
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("got %v, want ErrProtocol", err)
			}
		})
	}
	t.Run("crosses end", func(t *testing.T) {
		s := newTestSession(t, 65536, 0)
		*s.prod.r.head, *s.prod.r.tail = 65536-64, 65536+64
		s.cons.readPos, s.cons.head, s.cons.lastTail = 65536-64, 65536-64, 65536-64
		putRecordHeader(s.prod.r.buf[65536-64:], recordHeader{Len: 128, Kind: kindRequest})
		if _, err := s.cons.next(kindRequest, stopAfter(time.Second)); !errors.Is(err, ErrProtocol) {
			t.Fatalf("got %v, want ErrProtocol", err)
		}
	})
}

// TestRingConcurrent streams records between two goroutines through the eventfd wait
// protocol, with the consumer holding several records and releasing them out of order.
func TestRingConcurrent(t *testing.T) {
	for _, spin := range []time.Duration{0, 20 * time.Microsecond} {
		t.Run("spin="+spin.String(), func(t *testing.T) {
			s := newTestSession(t, 65536, spin)
			const n = 3000
			var wg sync.WaitGroup
			quit := make(chan struct{})
			// Runs before the segment is unmapped (cleanups are LIFO), so a failing test
			// never leaves the producer touching unmapped memory.
			t.Cleanup(func() { close(quit); wg.Wait() })
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := mrand.New(mrand.NewPCG(1, 2))
				stop := func() (time.Duration, error) {
					select {
					case <-quit:
						return 0, errStopped
					default:
						return 0, nil
					}
				}
				for id := uint64(1); id <= n; id++ {
					size := rng.IntN(9000)
					rsize := align64(uint64(recordHeaderSize + size))
					pos, err := s.prod.reserve(rsize, stop)
					if errors.Is(err, errStopped) {
						return
					}
					if err != nil {
						t.Error(err)
						return
					}
					s.fill(pos, rsize, id, size)
					s.prod.commit(pos, false)
				}
			}()
			rng := mrand.New(mrand.NewPCG(3, 4))
			var held []record
			for id := uint64(1); id <= n; id++ {
				// Holding the oldest record pins head, so the consumer must let go of
				// everything before it sleeps, or the producer waits for space forever.
				rec, err := s.cons.next(kindRequest, func() (time.Duration, error) { return 0, errStopped })
				if errors.Is(err, errStopped) {
					rng.Shuffle(len(held), func(i, j int) { held[i], held[j] = held[j], held[i] })
					for _, r := range held {
						s.cons.release(r.seq)
					}
					held = held[:0]
					rec, _ = s.read(t)
				} else if err != nil {
					t.Fatal(err)
				}
				if rec.hdr.RequestID != id {
					t.Fatalf("read id %d, want %d", rec.hdr.RequestID, id)
				}
				held = append(held, rec)
				for len(held) > 0 && (len(held) > 4 || rng.IntN(2) == 0) {
					i := rng.IntN(len(held))
					s.cons.release(held[i].seq)
					held = append(held[:i], held[i+1:]...)
				}
			}
			for _, r := range held {
				s.cons.release(r.seq)
			}
			wg.Wait()
			if *s.prod.r.head != *s.prod.r.tail {
				t.Fatalf("head %d != tail %d after releasing everything", *s.prod.r.head, *s.prod.r.tail)
			}
		})
	}
}

func TestWaitWakesOnPost(t *testing.T) {
	s := newTestSession(t, 65536, 0)
	got := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		rec, err := s.cons.next(kindRequest, stopAfter(5*time.Second))
		if err != nil {
			t.Error(err)
		}
		s.cons.release(rec.seq)
		got <- time.Since(start)
	}()
	// Write once the reader has said it sleeps on the eventfd (SPEC §4.5).
	eventually(t, "the reader to sleep", func() bool { return atomic.LoadUint32(s.cons.r.consumerWaiting) == 1 })
	s.write(t, 1, 10)
	if d := <-got; d > 2*time.Second {
		t.Fatalf("reader woke after %v", d)
	}
}

func TestRingSizeFor(t *testing.T) {
	for n, want := range map[uint64]uint64{1: 65536, 65536: 65536, 65537: 131072, 5 << 20: 8 << 20} {
		if got := ringSizeFor(n); got != want || bits.OnesCount64(got) != 1 {
			t.Errorf("ringSizeFor(%d) = %d, want %d", n, got, want)
		}
	}
	_ = io.EOF
}
