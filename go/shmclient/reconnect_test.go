package shmclient

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Reconnecting against the fake daemon, whose sessions the tests script: draining, the
// daemon's goodbye, refusals, a socket that goes away. restart_test.go does the same
// against real daemons that are killed and restarted.

// fakeID is a session id for the fake daemon's n-th session.
func fakeID(n int) func(w *welcomeMsg) {
	return func(w *welcomeMsg) { w.Session = strings.Repeat(string(rune('0'+n)), 32) }
}

// handlers records what a Client's disconnect and reconnect handlers were called with.
type handlers struct {
	mu          sync.Mutex
	disconnects []error
	reconnects  chan struct{}
}

func newHandlers() *handlers { return &handlers{reconnects: make(chan struct{}, 16)} }

func (h *handlers) opts() []Option {
	return []Option{
		WithDisconnectHandler(func(err error) {
			h.mu.Lock()
			h.disconnects = append(h.disconnects, err)
			h.mu.Unlock()
		}),
		WithReconnectHandler(func() { h.reconnects <- struct{}{} }),
	}
}

func (h *handlers) disconnected() []error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]error(nil), h.disconnects...)
}

func (h *handlers) waitReconnect(t *testing.T) {
	t.Helper()
	select {
	case <-h.reconnects:
	case <-time.After(10 * time.Second):
		t.Fatal("no reconnect within 10s")
	}
}

func dialFakeAt(t *testing.T, d *fakeDaemon, opts ...Option) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, d.path(), opts...)
	if err != nil {
		t.Fatalf("Dial (fake daemon): %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// settle waits until the process runs no more goroutines than before: a Client that was
// closed leaves none behind.
func settle(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before the Client:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}

var one = FromFloat32("x", []int64{1}, []float32{1})

// TestDrainingFake: once the daemon says it is draining, new calls wait for the next
// session while the request in flight finishes on the old one; then the client ends the
// old session itself, connects again, fetches the new daemon's models, and the waiting
// call is served there.
func TestDrainingFake(t *testing.T) {
	before := runtime.NumGoroutine()
	d := newFakeDaemon(t)
	push, gate := make(chan any, 1), make(chan struct{})
	served1 := d.serveOne(t, fakeSession{name: "one", welcome: fakeID(1), push: push, gate: gate})
	h := newHandlers()
	c := dialFakeAt(t, d, append(h.opts(), WithReconnectWait(time.Millisecond))...)
	ctx := testCtx(t)
	s1 := c.sess()

	req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: F32, Shape: []int64{1}})
	if err != nil {
		t.Fatal(err)
	}
	if err := req.Send(ctx); err != nil {
		t.Fatal(err)
	}
	// A request reserved before the draining message is not sent after it.
	late, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: F32, Shape: []int64{1}})
	if err != nil {
		t.Fatal(err)
	}
	push <- &drainingMsg{Type: "draining", GraceMS: 5000}
	eventually(t, "the draining message", func() bool { return s1.draining.Load() })
	if err := late.Send(ctx); !errors.Is(err, ErrShuttingDown) || !SafeToRetry(err) || !isGone(err) {
		t.Fatalf("Send after draining: %v, want ErrShuttingDown, safe to retry", err)
	}
	tail := *s1.req.r.tail

	inferred := make(chan error, 1)
	go func() {
		_, err := c.Infer(ctx, "other", one)
		inferred <- err
	}()
	health, err := c.Health(ctx) // control messages still go to the draining session
	if err != nil || !health.Ready {
		t.Fatalf("Health on a draining session: %+v, %v", health, err)
	}
	time.Sleep(50 * time.Millisecond) // give the Infer time to go wrong
	select {
	case err := <-inferred:
		t.Fatalf("Infer returned during the drain: %v", err)
	default:
	}
	if *s1.req.r.tail != tail {
		t.Fatal("a request was written to the draining session")
	}
	if errs := h.disconnected(); len(errs) != 1 || !errors.Is(errs[0], ErrShuttingDown) {
		t.Fatalf("disconnect handler called with %v, want one ErrShuttingDown", errs)
	}

	// The next daemon serves another model too: the metadata must be fetched again.
	served2 := d.serveOne(t, fakeSession{name: "two", welcome: fakeID(2), models: []string{"identity", "other"}})
	close(gate)
	resp, err := req.Wait(ctx)
	if err != nil {
		t.Fatalf("the request in flight during the drain: %v", err)
	}
	resp.Release()
	<-served1 // the client said goodbye: nothing was left in flight
	h.waitReconnect(t)
	if err := <-inferred; err != nil {
		t.Fatalf("Infer that waited for the next session: %v", err)
	}
	if c.Session() != strings.Repeat("2", 32) || c.models.get("other") == nil {
		t.Fatalf("session %s, models %v: want the second session's", c.Session(), c.models.p.Load())
	}
	if s1.Err() == nil || len(h.disconnected()) != 1 {
		t.Fatalf("old session: %v; disconnects %v", s1.Err(), h.disconnected())
	}
	c.Close()
	<-served2
	settle(t, before)
}

// TestDrainingWithoutReconnectFake: a Client that does not reconnect fails new work at
// once while its daemon drains (safe to retry), finishes what is in flight, then ends.
func TestDrainingWithoutReconnectFake(t *testing.T) {
	d := newFakeDaemon(t)
	push, gate := make(chan any, 1), make(chan struct{})
	d.serveOne(t, fakeSession{name: "one", push: push, gate: gate})
	c := dialFakeAt(t, d, WithReconnect(false))
	ctx := testCtx(t)
	req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: F32, Shape: []int64{1}})
	if err != nil {
		t.Fatal(err)
	}
	if err := req.Send(ctx); err != nil {
		t.Fatal(err)
	}
	push <- &drainingMsg{Type: "draining", GraceMS: 5000}
	eventually(t, "the draining message", func() bool { return c.sess().draining.Load() })
	_, err = c.Infer(ctx, "identity", one)
	if !errors.Is(err, ErrShuttingDown) || !SafeToRetry(err) {
		t.Fatalf("Infer during the drain: %v, want ErrShuttingDown, safe to retry", err)
	}
	close(gate)
	resp, err := req.Wait(ctx)
	if err != nil {
		t.Fatalf("the request in flight during the drain: %v", err)
	}
	resp.Release()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the Client did not end after its drained session")
	}
	if err := c.Err(); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("Err: %v", err)
	}
}

// TestGoodbyeReconnectsFake: the daemon's goodbye ends the session; the Client dials
// again and the next call is served by the new session.
func TestGoodbyeReconnectsFake(t *testing.T) {
	d := newFakeDaemon(t)
	push := make(chan any, 1)
	d.serveOne(t, fakeSession{name: "one", welcome: fakeID(1), push: push})
	h := newHandlers()
	c := dialFakeAt(t, d, append(h.opts(), WithReconnectWait(time.Millisecond))...)
	ctx := testCtx(t)
	if _, err := c.Infer(ctx, "identity", one); err != nil {
		t.Fatal(err)
	}
	d.serveOne(t, fakeSession{name: "two", welcome: fakeID(2)})
	push <- &goodbyeMsg{Type: "goodbye", Reason: "daemon is shutting down"}
	h.waitReconnect(t)
	if _, err := c.Infer(ctx, "identity", one); err != nil {
		t.Fatal(err)
	}
	errs := h.disconnected()
	if len(errs) != 1 || !errors.Is(errs[0], ErrClosed) || !errors.Is(errs[0], ErrShuttingDown) {
		t.Fatalf("disconnect handler called with %v", errs)
	}
	if c.Session() != strings.Repeat("2", 32) || c.Err() != nil {
		t.Fatalf("session %s, Err %v", c.Session(), c.Err())
	}
}

// TestRetryFake: with WithRetry, Infer makes again what the daemon refused without
// running it (SHUTTING_DOWN, OVERLOADED), never what may have run (MODEL_FAILED); without
// it the errors are returned, saying whether a retry is safe.
func TestRetryFake(t *testing.T) {
	for _, tc := range []struct {
		name  string
		code  uint64
		retry bool
		want  error // nil: served on the second attempt
		safe  bool
	}{
		{"SHUTTING_DOWN", CodeShuttingDown, false, ErrShuttingDown, true},
		{"SHUTTING_DOWN", CodeShuttingDown, true, nil, true},
		{"OVERLOADED", CodeOverloaded, false, ErrOverloaded, true},
		{"OVERLOADED", CodeOverloaded, true, nil, true},
		{"MODEL_FAILED", CodeModelFailed, true, ErrModelFailed, false},
		{"UNKNOWN_MODEL", CodeUnknownModel, true, ErrUnknownModel, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var n atomic.Int32
			d := newFakeDaemon(t)
			d.serveOne(t, fakeSession{name: "retry", fail: func() *descError {
				if n.Add(1) == 1 {
					return &descError{Code: tc.code, Name: tc.name, Message: "refused"}
				}
				return nil
			}})
			c := dialFakeAt(t, d, WithRetry(tc.retry), WithReconnectWait(time.Millisecond))
			out, err := c.Infer(testCtx(t), "identity", one)
			if tc.want == nil {
				if err != nil || len(out) != 1 || n.Load() != 2 {
					t.Fatalf("got %v, %v after %d attempts; want served on the second", out, err, n.Load())
				}
				return
			}
			if !errors.Is(err, tc.want) || n.Load() != 1 {
				t.Fatalf("got %v after %d attempts, want %v after 1", err, n.Load(), tc.want)
			}
			checkRetrySafety(t, tc.name, err, tc.safe)
		})
	}
}

// TestMaxReconnectsFake: with no daemon to come back, the Client gives up after
// WithMaxReconnects failed attempts and ends; the calls waiting fail with ErrUnavailable.
func TestMaxReconnectsFake(t *testing.T) {
	before := runtime.NumGoroutine()
	d := newFakeDaemon(t)
	push := make(chan any, 1)
	d.serveOne(t, fakeSession{name: "one", push: push})
	c := dialFakeAt(t, d, WithMaxReconnects(3), WithReconnectWait(time.Millisecond), WithMaxReconnectWait(5*time.Millisecond))
	d.ln.Close() // the socket file goes: every dial fails with ENOENT
	push <- &goodbyeMsg{Type: "goodbye", Reason: "daemon is shutting down"}
	eventually(t, "the session to end", func() bool { return c.sess().ended() })
	_, err := c.Infer(testCtx(t), "identity", one)
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the Client did not give up")
	}
	for what, err := range map[string]error{"Infer": err, "Err": c.Err()} {
		if !errors.Is(err, ErrClosed) || !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "gave up reconnecting after 3 attempts") {
			t.Errorf("%s: %v, want ErrClosed and ErrUnavailable after 3 attempts", what, err)
		}
	}
	if !SafeToRetry(err) {
		t.Errorf("%v is not safe to retry", err)
	}
	c.Close()
	settle(t, before)
}

// TestNoSessionBeforeDeadlineFake: a call whose context ends while the Client reconnects
// fails with the context's error and ErrUnavailable, saying why there is no session.
func TestNoSessionBeforeDeadlineFake(t *testing.T) {
	d := newFakeDaemon(t)
	push := make(chan any, 1)
	d.serveOne(t, fakeSession{name: "one", push: push})
	c := dialFakeAt(t, d, WithReconnectWait(time.Millisecond), WithMaxReconnectWait(5*time.Millisecond))
	d.ln.Close()
	push <- &goodbyeMsg{Type: "goodbye", Reason: "daemon is shutting down"}
	eventually(t, "the session to end", func() bool { return c.sess().ended() })
	eventually(t, "a failed dial", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return errors.Is(c.lastErr, ErrUnavailable)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := c.Infer(ctx, "identity", one)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrClosed) || !SafeToRetry(err) {
		t.Fatalf("got %v, want DeadlineExceeded and ErrUnavailable, safe to retry", err)
	}
	if !strings.Contains(err.Error(), "no tensord daemon at "+d.path()) {
		t.Fatalf("%q does not say why", err)
	}
	hctx, hcancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer hcancel()
	if _, err := c.Health(hctx); !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Health while reconnecting: %v", err)
	}
}

// TestCloseWhileReconnectingFake: Close stops reconnecting at once, even during a
// handshake the daemon does not answer, fails the calls waiting for a session, and
// leaves no goroutine behind.
func TestCloseWhileReconnectingFake(t *testing.T) {
	before := runtime.NumGoroutine()
	d := newFakeDaemon(t)
	push := make(chan any, 1)
	d.serveOne(t, fakeSession{name: "one", push: push})
	c := dialFakeAt(t, d, WithReconnectWait(time.Millisecond))
	// Nobody accepts the next connection: the kernel queues it, and the handshake
	// waits for a welcome that never comes.
	push <- &goodbyeMsg{Type: "goodbye", Reason: "daemon is shutting down"}
	eventually(t, "the session to end", func() bool { return c.sess().ended() })
	waiting := make(chan error, 1)
	go func() {
		_, err := c.Infer(context.Background(), "identity", one)
		waiting <- err
	}()
	time.Sleep(20 * time.Millisecond) // the dial is under way
	start := time.Now()
	c.Close()
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Close took %v", took)
	}
	select {
	case err := <-waiting:
		if !errors.Is(err, ErrClosed) || !SafeToRetry(err) {
			t.Fatalf("waiting call: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting call did not fail on Close")
	}
	if err := c.Ping(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Ping after Close: %v", err)
	}
	d.ln.Close()
	settle(t, before)
}

// TestHandlerMayCloseFake: a handler may close the Client (Close does not wait for the
// handler that calls it).
func TestHandlerMayCloseFake(t *testing.T) {
	d := newFakeDaemon(t)
	push := make(chan any, 1)
	d.serveOne(t, fakeSession{name: "one", push: push})
	var c *Client
	closed := make(chan struct{})
	c = dialFakeAt(t, d, WithDisconnectHandler(func(error) {
		c.Close()
		close(closed)
	}))
	push <- &goodbyeMsg{Type: "goodbye", Reason: "daemon is shutting down"}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close in a handler did not return")
	}
	<-c.Done()
}

func TestReconnectOptions(t *testing.T) {
	for _, opt := range []Option{WithReconnectWait(0), WithMaxReconnectWait(-time.Second), WithMaxReconnects(-2)} {
		if err := opt(&options{}); err == nil {
			t.Errorf("option accepted a bad value")
		}
	}
	o := defaultOptions()
	if !o.reconnect || o.retry || o.maxReconnects != -1 || o.reconnectWait != DefaultReconnectWait || o.maxReconnectWait != DefaultMaxReconnectWait {
		t.Fatalf("defaults %+v", o)
	}
	var b backoff
	o.reconnectWait, o.maxReconnectWait = 10*time.Millisecond, 50*time.Millisecond
	b.init(&o)
	for i, hi := range []time.Duration{15, 30, 50, 50, 50} {
		if d := b.pause(); d > hi*time.Millisecond || d < 5*time.Millisecond {
			t.Fatalf("pause %d: %v, want in [5ms, %dms]", i, d, hi)
		}
	}
}
