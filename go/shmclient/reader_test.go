package shmclient

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// Tests of the response ring's reader role (reader.go): a goroutine in Wait reads for
// itself and for others, and readResponses reads when nobody waits.

func sendBytes(t *testing.T, c *Client, ctx context.Context, data []byte) Request {
	t.Helper()
	req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: U8, Shape: []int64{int64(len(data))}})
	if err != nil {
		t.Fatal(err)
	}
	copy(req.Input(0).Data, data)
	if err := req.Send(ctx); err != nil {
		t.Fatal(err)
	}
	return req
}

func waitBytes(t *testing.T, req Request, ctx context.Context, want []byte) {
	t.Helper()
	resp, err := req.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Release()
	if !bytes.Equal(resp.Outputs[0].Data, want) {
		t.Fatalf("response of %d bytes does not match its request", len(want))
	}
}

// TestPipelinedSends has one goroutine keep several requests in flight and wait for
// them out of order, so that each Wait reads responses that belong to others, and
// responses arrive when no Wait is running (readResponses must pick them up).
func TestPipelinedSends(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	const n = 8
	for round := 0; round < 20; round++ {
		reqs := make([]Request, n)
		data := make([][]byte, n)
		for i := range reqs {
			data[i] = bytes.Repeat([]byte{byte(round*n + i)}, 100+i)
			reqs[i] = sendBytes(t, c, ctx, data[i])
		}
		order := []int{n - 1, 0, 3, 2, 1, 4, 6, 5, 7}[:n]
		if round%2 == 1 {
			// Waiting in order also leaves later responses to arrive between Waits.
			order = []int{0, 1, 2, 3, 4, 5, 6, 7}
			time.Sleep(time.Millisecond)
		}
		for _, i := range order {
			waitBytes(t, reqs[i], ctx, data[i])
		}
	}
	checkRingsIdle(t, c)
}

func waiters(c *Client) int {
	s := c.sess()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.waiters
}

// checkRingsIdle waits until every response has been read and released.
func checkRingsIdle(t *testing.T, c *Client) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	s := c.sess()
	for {
		s.mu.Lock()
		inFlight, waiters := s.inFlight, s.waiters
		s.mu.Unlock()
		head, tail := atomic.LoadUint64(s.resp.r.head), atomic.LoadUint64(s.resp.r.tail)
		if inFlight == 0 && waiters == 0 && head == tail {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("responses left: %d in flight, %d waiters, response ring head %d, tail %d", inFlight, waiters, head, tail)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestAbandonedResponseReleased: the response of a request whose Wait gave up is read
// and released on arrival even though no Wait runs afterwards.
func TestAbandonedResponseReleased(t *testing.T) {
	c := dialTest(t, WithRingSize(65536, 65536))
	ctx := testCtx(t)
	payload := make([]byte, 40000)
	// A held 40 KB response leaves no room for the next one.
	held := sendBytes(t, c, ctx, payload)
	resp, err := held.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req := sendBytes(t, c, ctx, payload)
	wctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = req.Wait(wctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want context.DeadlineExceeded", err)
	}
	resp.Release()
	checkRingsIdle(t, c)
	// The session goes on.
	waitBytes(t, sendBytes(t, c, ctx, payload), ctx, payload)
}

// TestCancelWhileReading: a Wait that is reading the ring itself returns at once when
// its context is cancelled, and one that waits behind it gets its response.
func TestCancelWhileReading(t *testing.T) {
	c := dialTest(t, WithRingSize(65536, 65536))
	ctx := testCtx(t)
	held := sendBytes(t, c, ctx, make([]byte, 40000))
	resp, err := held.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Neither response fits until resp is released; then both do.
	payload := make([]byte, 30000)
	first, second := sendBytes(t, c, ctx, payload), sendBytes(t, c, ctx, payload)
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := first.Wait(cctx)
		done <- err
	}()
	secondDone := make(chan error, 1)
	go func() {
		resp, err := second.Wait(ctx)
		if err == nil {
			resp.Release()
		}
		secondDone <- err
	}()
	// Cancel once both wait and one of them reads the ring; no response can come before
	// resp is released, so returning at all is returning at once.
	eventually(t, "both Waits, one reading", func() bool { return waiters(c) == 2 && len(c.sess().readerTok) == 1 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after cancel")
	}
	resp.Release()
	select {
	case err := <-secondDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the second Wait got no response")
	}
	checkRingsIdle(t, c)
}

// TestCloseWhileReading: Close ends a Wait that is reading the ring at once.
func TestCloseWhileReading(t *testing.T) {
	c := dialTest(t, WithRingSize(65536, 65536))
	ctx := testCtx(t)
	payload := make([]byte, 40000)
	held := sendBytes(t, c, ctx, payload)
	resp, err := held.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Release()
	req := sendBytes(t, c, ctx, payload)
	done := make(chan error, 1)
	go func() {
		_, err := req.Wait(ctx)
		done <- err
	}()
	// Close once the Wait reads the ring itself; its response cannot come while resp is
	// held, so returning at all is returning at once.
	eventually(t, "the Wait to read", func() bool { return waiters(c) == 1 && len(c.sess().readerTok) == 1 })
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("got %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after Close")
	}
}
