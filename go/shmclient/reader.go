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
// largest client-side cost after the semaphore calls themselves. Responses to other
// requests read on the way are handed to their waiters' channels (dispatch).
//
// readResponses reads when requests are in flight but no goroutine is in Wait (after a
// Wait that gave up, or Sends not yet followed by Wait), so that their responses are
// still delivered or released on arrival. While any goroutine is in Wait, that one
// reads or, leaving, re-checks: the last to leave kicks readResponses if needed, and
// readResponses gives the token back as soon as a goroutine waits again.

// readResponses is the fallback reader described above; it holds a segment reference
// for the session's lifetime.
func (c *Client) readResponses() {
	defer c.wg.Done()
	defer c.seg.release()
	stop := func() (time.Duration, error) {
		select {
		case <-c.done:
			return 0, ErrClosed
		default:
		}
		if !c.unattended() {
			return 0, errIdle
		}
		return 0, nil
	}
	for {
		select {
		case <-c.readerKick:
		case <-c.done:
			return
		}
		select {
		case c.readerTok <- struct{}{}:
		case <-c.done:
			return
		}
		var err error
		for err == nil {
			var rec record
			if rec, err = c.resp.next(kindResponse, stop); err == nil {
				c.dispatch(rec)
			}
		}
		<-c.readerTok
		if errors.Is(err, ErrProtocol) {
			c.shutdown(&closedError{msg: "shmclient: the response ring is corrupt, session closed", cause: err})
		}
		if !errors.Is(err, errIdle) {
			return
		}
	}
}

// errIdle stops readResponses' reading when it is not needed.
var errIdle = errors.New("no responses to read")

// unattended reports whether responses are due that no goroutine in Wait will read.
func (c *Client) unattended() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.inFlight > 0 && c.waiters == 0
}

// enterWait and leaveWait count the goroutines in Wait. Leaving is when responses can
// become unattended, so leaveWait kicks readResponses then.
func (c *Client) enterWait() {
	c.mu.Lock()
	c.waiters++
	c.mu.Unlock()
}

func (c *Client) leaveWait() {
	c.mu.Lock()
	c.waiters--
	kick := c.inFlight > 0 && c.waiters == 0
	c.mu.Unlock()
	if kick {
		select {
		case c.readerKick <- struct{}{}:
		default: // a kick is already pending
		}
	}
}

// readFor reads the response ring, holding readerTok, until the response to request id
// arrives, and returns it with ok. It returns !ok, having read whatever was there, when
// ctx or the session ends or a corrupt ring ends the session; the result then comes on
// the request's channel (an error from shutdown), or the caller gives up on ctx.
func (c *Client) readFor(ctx context.Context, id uint64) (res reqResult, ok bool) {
	// The reader must keep the mapping (and the semaphores) alive, like any view.
	if !c.seg.acquire() {
		return reqResult{}, false
	}
	defer c.seg.release()
	if ctx.Done() != nil {
		// A deadline bounds each semaphore wait (stop), but a cancellation must wake the
		// wait: post the semaphore this reader sleeps on. A post nobody needs is only a
		// spurious wake-up, which every waiter tolerates (SPEC §4.5).
		stopWake := context.AfterFunc(ctx, func() {
			if c.seg.acquire() {
				c.resp.dataSem.post()
				c.seg.release()
			}
		})
		defer stopWake()
	}
	stop := func() (time.Duration, error) {
		select {
		case <-c.done:
			return 0, ErrClosed
		default:
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if dl, ok := ctx.Deadline(); ok {
			d := time.Until(dl)
			if d <= 0 {
				return 0, context.DeadlineExceeded
			}
			return d, nil
		}
		return 0, nil
	}
	for {
		rec, err := c.resp.next(kindResponse, stop)
		if err != nil {
			if errors.Is(err, ErrProtocol) {
				c.shutdown(&closedError{msg: "shmclient: the response ring is corrupt, session closed", cause: err})
			}
			return reqResult{}, false
		}
		if rec.hdr.RequestID != id {
			c.dispatch(rec)
			continue
		}
		if c.take(id) == nil {
			// shutdown took it first and sends its error on the channel.
			c.resp.release(rec.seq)
			return reqResult{}, false
		}
		resp, err := c.parseResponse(rec)
		if err != nil {
			c.resp.release(rec.seq)
			return reqResult{err: err}, true
		}
		return reqResult{resp: resp}, true
	}
}

// take removes the waiter of a response just read and returns its channel, nil if it
// has none (it gave up, or the session is closing). Whoever takes a channel off
// pendingReq, here or in shutdown, is the one who delivers its result.
func (c *Client) take(id uint64) chan reqResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.pendingReq[id]
	delete(c.pendingReq, id)
	if c.inFlight > 0 {
		c.inFlight--
	}
	return ch
}

func (c *Client) dispatch(rec record) {
	ch := c.take(rec.hdr.RequestID)
	if ch == nil {
		// Its caller gave up (ctx) or the session is closing: nobody will read it.
		c.resp.release(rec.seq)
		return
	}
	resp, err := c.parseResponse(rec)
	if err != nil {
		c.resp.release(rec.seq)
		ch <- reqResult{err: err}
		return
	}
	ch <- reqResult{resp: resp}
}

// parseResponse turns a RESPONSE record into a Response whose outputs view the record.
// Everything is checked against the record's bounds first: a daemon bug must not turn
// into a wild slice. Errors here fail only this request (SPEC §4.8's rule for sound
// headers with unsound descriptors, applied to the daemon).
func (c *Client) parseResponse(rec record) (*Response, error) {
	descEnd := uint64(recordHeaderSize) + uint64(rec.hdr.DescLen)
	desc, err := decodeResponseDesc(rec.body[recordHeaderSize:descEnd])
	if err != nil {
		return nil, protocolErrorf("response %d: bad descriptor: %v", rec.hdr.RequestID, err)
	}
	if e := desc.Error; e != nil {
		return nil, &DaemonError{Code: e.Code, Name: e.Name, Message: e.Message}
	}
	recLen := uint64(len(rec.body))
	outs := make([]Tensor, len(desc.Outputs))
	for i, ref := range desc.Outputs {
		dt, err := ParseDType(ref.DType)
		if err != nil || !dt.valid() {
			return nil, protocolErrorf("response %d: output %q has dtype %q", rec.hdr.RequestID, ref.Name, ref.DType)
		}
		if ref.Offset%recordAlign != 0 || ref.Offset < align64(descEnd) || ref.Offset > recLen || ref.NBytes > recLen-ref.Offset {
			return nil, protocolErrorf("response %d: output %q at offset %d of %d bytes lies outside its record of %d bytes", rec.hdr.RequestID, ref.Name, ref.Offset, ref.NBytes, recLen)
		}
		shape := make([]int64, len(ref.Shape))
		for j, d := range ref.Shape {
			if d > math.MaxInt64 {
				return nil, protocolErrorf("response %d: output %q has dimension %d", rec.hdr.RequestID, ref.Name, d)
			}
			shape[j] = int64(d)
		}
		t := Tensor{Name: ref.Name, DType: dt, Shape: shape, Data: rec.body[ref.Offset : ref.Offset+ref.NBytes : ref.Offset+ref.NBytes]}
		if err := t.checkData(); err != nil {
			return nil, protocolErrorf("response %d: %v", rec.hdr.RequestID, err)
		}
		outs[i] = t
	}
	if !c.seg.acquire() {
		return nil, c.Err()
	}
	return &Response{Outputs: outs, c: c, seq: rec.seq}, nil
}
