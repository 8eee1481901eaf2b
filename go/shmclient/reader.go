package shmclient

import (
	"context"
	"errors"
	"math"
	"time"
)

// The response ring has one reader at a time: whoever holds Client.readerTok. A
// goroutine in Wait takes the token when it is free and reads the ring itself until its
// own response arrives (readFor), so a caller with one request in flight is woken by the
// daemon's post directly. Handing each response over from a reader goroutine instead
// costs a second wake-up, of an OS thread through the Go scheduler, per request: the
// largest client-side cost after the eventfd system calls themselves. Responses to other
// requests read on the way are handed to their waiters' channels (dispatch).
//
// readResponses reads when requests are in flight but no goroutine is in Wait (after a
// Wait that gave up, or Sends not yet followed by Wait), so that their responses are
// still delivered or released on arrival. While any goroutine is in Wait, that one
// reads or, leaving, re-checks: the last to leave kicks readResponses if needed, and
// readResponses gives the token back before its next sleep once a goroutine waits again
// (until then it hands that goroutine its response, on arrival, like any other).
//
// Whoever holds the token is the session's only sleeper on the pd eventfd, so however
// many goroutines wait, the session keeps at most one OS thread asleep on responses.

// readResponses is the fallback reader described above; it holds a segment reference
// for the session's lifetime.
func (s *session) readResponses() {
	defer s.wg.Done()
	defer s.seg.release()
	stop := func() (time.Duration, error) {
		select {
		case <-s.done:
			return 0, ErrClosed
		default:
		}
		if !s.unattended() {
			return 0, errIdle
		}
		return 0, nil
	}
	for {
		select {
		case <-s.readerKick:
		case <-s.done:
			return
		}
		select {
		case s.readerTok <- struct{}{}:
		case <-s.done:
			return
		}
		var err error
		for err == nil {
			var rec record
			if rec, err = s.resp.next(kindResponse, stop); err == nil {
				s.dispatch(rec)
			}
		}
		<-s.readerTok
		if errors.Is(err, ErrProtocol) {
			s.shutdown(&closedError{msg: "shmclient: the response ring is corrupt, session closed", cause: err})
		}
		if !errors.Is(err, errIdle) {
			return
		}
	}
}

// errIdle stops readResponses' reading when it is not needed.
var errIdle = errors.New("no responses to read")

// unattended reports whether responses are due that no goroutine in Wait will read.
func (s *session) unattended() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inFlight > 0 && s.waiters == 0
}

// enterWait and leaveWait count the goroutines in Wait. Leaving is when responses can
// become unattended, so leaveWait kicks readResponses then.
func (s *session) enterWait() {
	s.mu.Lock()
	s.waiters++
	s.mu.Unlock()
}

func (s *session) leaveWait() {
	s.mu.Lock()
	s.waiters--
	kick := s.inFlight > 0 && s.waiters == 0
	s.mu.Unlock()
	if kick {
		select {
		case s.readerKick <- struct{}{}:
		default: // a kick is already pending
		}
	}
}

// readFor reads the response ring, holding readerTok, until the response to cl arrives,
// and returns the verdict on it (nil: parsed into cl) with ok. It returns !ok, having
// read whatever was there, when ctx or the session ends or a corrupt ring ends the
// session; the verdict then comes on cl.ch (an error from shutdown), or the caller gives
// up on ctx.
func (s *session) readFor(ctx context.Context, cl *call) (verdict error, ok bool) {
	// The reader must keep the mapping (and the eventfds) alive, like any view.
	if !s.seg.acquire() {
		return nil, false
	}
	defer s.seg.release()
	cw := ctxWait{ctx: ctx, s: s, reader: true}
	defer cw.done()
	stop := func() (time.Duration, error) {
		if s.ended() {
			return 0, ErrClosed
		}
		return cw.check()
	}
	for {
		rec, err := s.resp.next(kindResponse, stop)
		if err != nil {
			if errors.Is(err, ErrProtocol) {
				s.shutdown(&closedError{msg: "shmclient: the response ring is corrupt, session closed", cause: err})
			}
			return nil, false
		}
		if rec.hdr.RequestID != cl.id {
			s.dispatch(rec)
			continue
		}
		if s.take(cl.id) == nil {
			// shutdown took it first and sends its error on the channel.
			s.resp.release(rec.seq)
			return nil, false
		}
		return s.parseInto(cl, rec), true
	}
}

// wakeReader posts the eventfd the response reader sleeps on.
func (s *session) wakeReader() {
	if s.seg.acquire() {
		s.resp.data.post()
		s.seg.release()
	}
}

// dispatch hands a response read by one goroutine to the call it answers.
func (s *session) dispatch(rec record) {
	cl := s.take(rec.hdr.RequestID)
	if cl == nil {
		// Its caller gave up (ctx) or the session is closing: nobody will read it.
		s.resp.release(rec.seq)
		return
	}
	cl.ch <- s.parseInto(cl, rec) // the one send after take; cl.ch has room
}

// parseInto parses a RESPONSE record into cl's outputs. On success cl holds the record
// (cl.seq) and a segment reference for its views, both given back by Response.Release; on
// error it holds neither, and the error is the request's (a *DaemonError, or ErrProtocol
// for a response this client cannot use).
func (s *session) parseInto(cl *call, rec record) error {
	err := s.parseOutputs(cl, rec)
	if err == nil && !s.seg.acquire() {
		err = s.Err()
		if err == nil {
			err = ErrClosed
		}
	}
	if err != nil {
		s.resp.release(rec.seq)
		return err
	}
	cl.seq = rec.seq
	return nil
}

// parseOutputs turns a RESPONSE record into cl.outputs, views of the record, reusing the
// call's buffers. Everything is checked against the record's bounds first: a daemon bug
// must not turn into a wild slice. Errors here fail only this request (SPEC §4.8's rule
// for sound headers with unsound descriptors, applied to the daemon).
func (s *session) parseOutputs(cl *call, rec record) error {
	descEnd := uint64(recordHeaderSize) + uint64(rec.hdr.DescLen)
	b := rec.body[recordHeaderSize:descEnd]
	refs, rdims, ok := decodeOutputsInto(b, cl.refs, cl.rdims)
	if ok {
		cl.refs, cl.rdims = refs, rdims
	} else {
		desc, err := decodeResponseDescGeneral(b)
		if err != nil {
			return protocolErrorf("response %d: bad descriptor: %v", rec.hdr.RequestID, err)
		}
		if e := desc.Error; e != nil {
			return daemonError(e.Code, e.Name, e.Message, false, e.Input, e.Item, e.Limit)
		}
		refs = desc.Outputs
	}
	recLen := uint64(len(rec.body))
	outs, dims := cl.outputs[:0], cl.odims[:0]
	if dims == nil {
		dims = make([]int64, 0, 8)
	}
	for i := range refs {
		ref := &refs[i]
		dt, err := ParseDType(ref.DType)
		if err != nil || !dt.valid() {
			return protocolErrorf("response %d: output %q has dtype %q", rec.hdr.RequestID, ref.Name, ref.DType)
		}
		if ref.Offset%recordAlign != 0 || ref.Offset < align64(descEnd) || ref.Offset > recLen || ref.NBytes > recLen-ref.Offset {
			return protocolErrorf("response %d: output %q at offset %d of %d bytes lies outside its record of %d bytes", rec.hdr.RequestID, ref.Name, ref.Offset, ref.NBytes, recLen)
		}
		start := len(dims)
		for _, d := range ref.Shape {
			if d > math.MaxInt64 {
				return protocolErrorf("response %d: output %q has dimension %d", rec.hdr.RequestID, ref.Name, d)
			}
			dims = append(dims, int64(d))
		}
		t := Tensor{Name: ref.Name, DType: dt, Shape: dims[start:len(dims):len(dims)],
			Data: rec.body[ref.Offset : ref.Offset+ref.NBytes : ref.Offset+ref.NBytes]}
		if err := t.checkData(); err != nil {
			return protocolErrorf("response %d: %v", rec.hdr.RequestID, err)
		}
		outs = append(outs, t)
	}
	cl.outputs, cl.odims = outs, dims
	return nil
}
