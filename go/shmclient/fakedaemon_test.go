package shmclient

import (
	"bytes"
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tensord/tensord/go/shmclient/internal/shmtest"
)

// A fake daemon for unit tests: it plays the daemon's side of SPEC §2.4 with a welcome of
// the test's making, sending a real sealed memfd and four real eventfds with it
// (SCM_RIGHTS), so that every way a handshake can fail once descriptors arrived can be
// tried; and, for sessions that go on, the daemon's side of the rings, answering every
// request like the identity model. It serves one process's client from goroutines of
// the same process, through its own mapping of the segment and its own descriptors of
// the eventfds, so the client sees what it sees with the real daemon, without the
// daemon's timing: the integration tests (client_test.go and others) use the real one.

type fakeSession struct {
	name    string
	welcome func(w *welcomeMsg)
	image   []byte // the memfd's first bytes; nil: a correct header
	size    func(size int64) int64
	// fds chooses the descriptors sent with the welcome, given the segment's and the
	// eventfds' (nil: all five, in order). Descriptors it creates are closed once sent.
	fds   func(t testing.TB, seg int, efds [4]int) []int
	after func(conn net.Conn) // what the daemon does once the welcome is sent; nil: serve
	want  error               // what Dial's error must wrap

	// For sessions that go on (after == nil):
	models []string          // the models model_list names (nil: identity), each like identity
	push   <-chan any        // control messages to send the client (draining, goodbye, ...)
	gate   chan struct{}     // if set, each request is answered only after a receive from it
	fail   func() *descError // if set and it returns an error, a request is answered with it
}

type fakeDaemon struct {
	ln *net.UnixListener
}

func newFakeDaemon(t testing.TB) *fakeDaemon {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "fake.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &fakeDaemon{ln: ln}
}

func (d *fakeDaemon) path() string { return d.ln.Addr().String() }

// serveOne accepts one connection in the background and plays fs; the channel is closed
// once the fake daemon has closed everything of its own.
func (d *fakeDaemon) serveOne(t testing.TB, fs fakeSession) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.serve(t, fs)
	}()
	return done
}

const fakeRing = 65536

func fakeWelcome() welcomeMsg {
	return welcomeMsg{
		Type: "welcome", Version: protocolVersion, Session: strings.Repeat("ab", 16),
		SegmentSize: headerSize + 2*fakeRing, RequestRing: fakeRing, ResponseRing: fakeRing,
		MaxFrame: maxFrame, Daemon: "fake",
	}
}

func (d *fakeDaemon) serve(t testing.TB, fs fakeSession) {
	conn, err := d.ln.AcceptUnix()
	if err != nil {
		t.Errorf("accept: %v", err)
		return
	}
	defer conn.Close()
	if _, err := readFrame(conn, maxFrame); err != nil {
		t.Errorf("reading hello: %v", err)
		return
	}
	w := fakeWelcome()
	if fs.welcome != nil {
		fs.welcome(&w)
	}
	size := int64(w.SegmentSize)
	if fs.size != nil {
		size = fs.size(size)
	}
	image := fs.image
	if image == nil {
		image = segmentHeader(fakeRing, fakeRing)
	}
	seg, err := shmtest.Memfd("tensord-fake-"+fs.name, size, image)
	if err != nil {
		t.Error(err)
		return
	}
	defer syscall.Close(seg) // the client gets its own copies
	efds, err := shmtest.Eventfds()
	if err != nil {
		t.Error(err)
		return
	}
	defer closeFDs(efds[:])
	own := append([]int{seg}, efds[:]...)
	send := own
	if fs.fds != nil {
		send = fs.fds(t, seg, efds)
	}
	frame, err := appendFrame(nil, &w)
	if err != nil {
		t.Error(err)
		return
	}
	var rights []byte
	if len(send) > 0 {
		rights = syscall.UnixRights(send...)
	}
	_, _, err = conn.WriteMsgUnix(frame, rights, nil)
	for _, fd := range send {
		if !containsFD(own, fd) {
			syscall.Close(fd)
		}
	}
	if err != nil {
		t.Errorf("sending the welcome: %v", err)
		return
	}
	if fs.after != nil {
		fs.after(conn)
		drain(conn)
		return
	}
	serveSession(t, conn, seg, efds, &fs)
}

func containsFD(fds []int, fd int) bool {
	for _, f := range fds {
		if f == fd {
			return true
		}
	}
	return false
}

// drain reads until the client hangs up.
func drain(conn net.Conn) {
	var buf [512]byte
	for {
		if _, err := conn.Read(buf[:]); err != nil {
			return
		}
	}
}

func writeFrame(conn net.Conn, msg any) error {
	frame, err := appendFrame(nil, msg)
	if err != nil {
		return err
	}
	_, err = conn.Write(frame)
	return err
}

// serveSession plays a working daemon: attached → ready, models, ping, goodbye, and the
// rings, until the client hangs up.
func serveSession(t testing.TB, conn net.Conn, segFD int, efds [4]int, fs *fakeSession) {
	if _, err := readFrame(conn, maxFrame); err != nil { // attached
		return
	}
	mem, err := syscall.Mmap(segFD, 0, headerSize+2*fakeRing, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		t.Error(err)
		return
	}
	defer syscall.Munmap(mem)
	rings := newFakeRings(mem, efds)
	rings.gate, rings.fail = fs.gate, fs.fail
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rings.serve(t)
	}()
	defer func() {
		rings.stop()
		wg.Wait()
	}()
	// Replies and pushed messages are written by two goroutines.
	var writeMu sync.Mutex
	send := func(msg any) error {
		writeMu.Lock()
		defer writeMu.Unlock()
		return writeFrame(conn, msg)
	}
	if fs.push != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case msg := <-fs.push:
					send(msg)
				case <-rings.quit:
					return
				}
			}
		}()
	}
	if err := send(&typeOnlyMsg{Type: "ready"}); err != nil {
		return
	}
	names := fs.models
	if names == nil {
		names = []string{"identity"}
	}
	for {
		body, err := readFrame(conn, maxFrame)
		if err != nil {
			return
		}
		_, msg, err := decodeMessage(body)
		if err != nil {
			t.Errorf("fake daemon: %v", err)
			return
		}
		switch m := msg.(type) {
		case *idMsg:
			switch m.Type {
			case "ping":
				send(&idMsg{Type: "pong", ID: m.ID})
			case "models":
				any := []wireSpec{{Name: "x", DType: "any"}}
				var models []wireModel
				for _, name := range names {
					models = append(models, wireModel{Name: name, Version: 1, Device: "cpu", Inputs: any, Outputs: []wireSpec{{Name: "y", DType: "any"}}})
				}
				send(&modelListMsg{Type: "model_list", ID: m.ID, Models: models})
			case "health":
				send(&healthReportMsg{Type: "health_report", ID: m.ID, Ready: true, Models: []wireModelHealth{}})
			}
		case *goodbyeMsg:
			return
		}
	}
}

// fakeRings is the daemon's side of the rings: it consumes the request ring and produces
// the response ring, with the same wait protocol (SPEC §4.5) on its own descriptors of
// the eventfds.
type fakeRings struct {
	req  consumer
	resp producer
	efds [numEventfds]eventfd
	quit chan struct{}
	gate chan struct{}
	fail func() *descError

	// The last request descriptor and what was made of it, so that a stream of like
	// requests costs the fake daemon no allocation (the client's allocations are counted
	// process-wide).
	lastDesc []byte
	respDesc []byte
	in       tensorRef
	dataOff  uint64
	recLen   uint64
}

func newFakeRings(mem []byte, fds [4]int) *fakeRings {
	f := &fakeRings{quit: make(chan struct{})}
	for i, fd := range fds {
		f.efds[i].fd = fd
	}
	s := &segment{mem: mem}
	f.req = consumer{r: s.ring(offReqControl, headerSize, fakeRing), data: &f.efds[efdReqData], space: &f.efds[efdReqSpace]}
	f.resp = producer{r: s.ring(offRespControl, headerSize+fakeRing, fakeRing), data: &f.efds[efdRespData], space: &f.efds[efdRespSpace]}
	return f
}

func (f *fakeRings) stop() {
	close(f.quit)
	f.efds[efdReqData].post()
	f.efds[efdRespSpace].post()
}

func (f *fakeRings) serve(t testing.TB) {
	stop := func() (time.Duration, error) {
		select {
		case <-f.quit:
			return 0, errStopped
		default:
			return 0, nil
		}
	}
	for {
		rec, err := f.req.next(kindRequest, stop)
		if err != nil {
			if !errors.Is(err, errStopped) {
				t.Errorf("fake daemon: %v", err)
			}
			return
		}
		if f.gate != nil {
			select {
			case <-f.gate:
			case <-f.quit:
				return
			}
		}
		var derr *descError
		if f.fail != nil {
			derr = f.fail()
		}
		if derr != nil {
			err = f.answerError(rec, derr, stop)
		} else {
			err = f.answer(rec, stop)
		}
		if err != nil {
			if !errors.Is(err, errStopped) {
				t.Errorf("fake daemon: %v", err)
			}
			return
		}
		f.req.release(rec.seq)
	}
}

// answer writes the identity model's response to a request: its first input as "y".
func (f *fakeRings) answer(rec record, stop func() (time.Duration, error)) error {
	desc := rec.body[recordHeaderSize : recordHeaderSize+rec.hdr.DescLen]
	if !sameButTimeout(desc, f.lastDesc) {
		d, err := decodeRequestDesc(desc)
		if err != nil {
			return err
		}
		if len(d.Inputs) != 1 {
			return errors.New("the fake identity model takes one input")
		}
		f.in = d.Inputs[0]
		out := tensorRef{Name: "y", DType: f.in.DType, Shape: f.in.Shape, NBytes: f.in.NBytes}
		for {
			enc, err := marshal(nil, &responseDesc{Outputs: []tensorRef{out}})
			if err != nil {
				return err
			}
			off := align64(recordHeaderSize + uint64(len(enc)))
			if out.Offset == off {
				f.respDesc, f.dataOff = enc, off
				break
			}
			out.Offset = off
		}
		f.recLen = align64(f.dataOff + f.in.NBytes)
		f.lastDesc = append(f.lastDesc[:0], desc...)
	}
	pos, err := f.resp.reserve(f.recLen, stop)
	if err != nil {
		return err
	}
	out := f.resp.slice(pos, f.recLen)
	putRecordHeader(out, recordHeader{Len: uint32(f.recLen), Kind: kindResponse, RequestID: rec.hdr.RequestID, DescLen: uint32(len(f.respDesc))})
	copy(out[recordHeaderSize:], f.respDesc)
	copy(out[f.dataOff:], rec.body[f.in.Offset:f.in.Offset+f.in.NBytes])
	f.resp.commit(pos, false)
	return nil
}

// answerError answers a request with an error descriptor.
func (f *fakeRings) answerError(rec record, e *descError, stop func() (time.Duration, error)) error {
	enc, err := marshal(nil, &responseDesc{Error: e})
	if err != nil {
		return err
	}
	n := align64(recordHeaderSize + uint64(len(enc)))
	pos, err := f.resp.reserve(n, stop)
	if err != nil {
		return err
	}
	out := f.resp.slice(pos, n)
	putRecordHeader(out, recordHeader{Len: uint32(n), Kind: kindResponse, RequestID: rec.hdr.RequestID, DescLen: uint32(len(enc))})
	copy(out[recordHeaderSize:], enc)
	f.resp.commit(pos, false)
	return nil
}

// sameButTimeout reports whether two canonical request descriptors differ at most in
// timeout_us, the one field that changes from call to call.
func sameButTimeout(a, b []byte) bool {
	ah, at, aok := splitAtTimeout(a)
	bh, bt, bok := splitAtTimeout(b)
	return aok && bok && bytes.Equal(ah, bh) && bytes.Equal(at, bt)
}

// splitAtTimeout returns a canonical request descriptor without timeout_us's value.
func splitAtTimeout(d []byte) (head, tail []byte, ok bool) {
	r := fastReader{b: d}
	r.mapLen()
	r.str() // "model"
	r.str()
	r.str() // "timeout_us"
	start := r.pos
	r.uint()
	return d[:start], d[r.pos:], !r.failed
}

// dialFake dials a fake daemon serving one working session; the session is closed, and
// the fake daemon has closed its side, when the test ends.
func dialFake(t testing.TB, opts ...Option) *Client {
	t.Helper()
	d := newFakeDaemon(t)
	served := d.serveOne(t, fakeSession{name: "session"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, d.path(), opts...)
	if err != nil {
		t.Fatalf("Dial (fake daemon): %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		<-served
	})
	return c
}
