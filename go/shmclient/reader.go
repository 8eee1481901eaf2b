package shmclient

import (
	"errors"
	"math"
	"time"
)

// readResponses is the response ring's single consumer: it waits on the response-data
// semaphore and hands each record to the goroutine waiting for its request_id.
func (c *Client) readResponses() {
	defer c.wg.Done()
	defer c.seg.release()
	stop := func() (time.Duration, error) {
		select {
		case <-c.done:
			return 0, ErrClosed
		default:
			return 0, nil
		}
	}
	for {
		rec, err := c.resp.next(kindResponse, stop)
		if err != nil {
			if errors.Is(err, ErrProtocol) {
				c.shutdown(&closedError{msg: "shmclient: the response ring is corrupt, session closed", cause: err})
			}
			return
		}
		c.dispatch(rec)
	}
}

func (c *Client) dispatch(rec record) {
	c.mu.Lock()
	ch := c.pendingReq[rec.hdr.RequestID]
	delete(c.pendingReq, rec.hdr.RequestID)
	c.mu.Unlock()
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
