package shmclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Real daemons killed (SIGKILL) or stopped (SIGTERM: the daemon drains) and restarted on
// the same socket while many goroutines call through one Client. Run with -v for the
// numbers: calls made and failed, the longest call, and how long reconnecting took.

const (
	restartCycles  = 3
	restartWorkers = 16
)

func TestRestartSIGKILL(t *testing.T) { testRestart(t, syscall.SIGKILL) }
func TestRestartSIGTERM(t *testing.T) { testRestart(t, syscall.SIGTERM) }

// restartLoad is what the workers saw.
type restartLoad struct {
	made, failed atomic.Int64
	longest      atomic.Int64 // nanoseconds
	mu           sync.Mutex
	failures     []error
}

func (l *restartLoad) record(took time.Duration, err error) {
	l.made.Add(1)
	for {
		old := l.longest.Load()
		if int64(took) <= old || l.longest.CompareAndSwap(old, int64(took)) {
			break
		}
	}
	if err != nil {
		l.failed.Add(1)
		l.mu.Lock()
		l.failures = append(l.failures, err)
		l.mu.Unlock()
	}
}

// restartCall is one worker's call: Infer, or the zero-copy path, which makes its
// request again, in the next session, when the error says it did not run.
func restartCall(ctx context.Context, c *Client, w, i int) error {
	data := make([]int32, 64+i%64)
	for j := range data {
		data[j] = int32(w<<24 | i<<8 | j)
	}
	if i%2 == 0 {
		out, err := c.Infer(ctx, "identity", FromInt32("x", []int64{int64(len(data))}, data))
		if err != nil {
			return err
		}
		if !bytes.Equal(out[0].Data, bytesOf(data)) {
			return fmt.Errorf("worker %d call %d: got someone else's data", w, i)
		}
		return nil
	}
	for {
		req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: I32, Shape: []int64{int64(len(data))}})
		if err != nil {
			return err
		}
		copy(req.Input(0).Int32s(), data)
		resp, err := req.Do(ctx)
		if err != nil {
			if SafeToRetry(err) && ctx.Err() == nil {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			return err
		}
		same := bytes.Equal(resp.Outputs[0].Data, bytesOf(data))
		resp.Release()
		if !same {
			return fmt.Errorf("worker %d call %d: got someone else's data", w, i)
		}
		return nil
	}
}

func testRestart(t *testing.T, sig syscall.Signal) {
	needDaemon(t)
	dir := t.TempDir()
	d, err := startDaemon(dir)
	if err != nil {
		t.Fatal(err)
	}
	sock := d.socket
	var dmu sync.Mutex
	t.Cleanup(func() {
		dmu.Lock()
		defer dmu.Unlock()
		d.kill(syscall.SIGKILL)
	})
	before := runtime.NumGoroutine()

	h := newHandlers()
	var drained atomic.Int32
	// The default backoff (50ms doubling up to 2s, jittered), so that the numbers are
	// what a service sees.
	opts := append(h.opts(), WithRetry(true),
		WithDisconnectHandler(func(err error) {
			if !errors.Is(err, ErrClosed) {
				drained.Add(1) // told it is draining before the session ended
			}
			h.mu.Lock()
			h.disconnects = append(h.disconnects, err)
			h.mu.Unlock()
		}))
	c, err := Dial(testCtx(t), sock, opts...)
	if err != nil {
		t.Fatal(err)
	}

	var load restartLoad
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < restartWorkers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				start := time.Now()
				err := restartCall(ctx, c, w, i)
				load.record(time.Since(start), err)
				cancel()
			}
		}(w)
	}

	var outage, reconnect, drain time.Duration
	for cycle := 0; cycle < restartCycles; cycle++ {
		n := load.made.Load()
		eventually(t, "calls on this session", func() bool { return load.made.Load() >= n+200 })
		killed := time.Now()
		dmu.Lock()
		d.kill(sig) // SIGTERM: returns once the daemon has drained and exited
		exited := time.Now()
		d, err = startDaemonOn(dir, sock)
		dmu.Unlock()
		if err != nil {
			close(stop)
			t.Fatal(err)
		}
		up := time.Now()
		select {
		case <-h.reconnects:
		case <-time.After(30 * time.Second):
			close(stop)
			t.Fatal("no reconnect within 30s of the new daemon's start")
		}
		back := time.Now()
		drain = max(drain, exited.Sub(killed))
		outage = max(outage, back.Sub(killed))
		reconnect = max(reconnect, back.Sub(up))
	}
	n := load.made.Load()
	eventually(t, "calls on the last session", func() bool { return load.made.Load() >= n+200 })
	close(stop)
	wg.Wait()

	t.Logf("%v, %d restarts, %d goroutines calling: %d calls made, %d failed; longest call %v; "+
		"daemon stop took up to %v; reconnected up to %v after the new daemon accepted (%v after the signal); %d of %d sessions told draining",
		sig, restartCycles, restartWorkers, load.made.Load(), load.failed.Load(), time.Duration(load.longest.Load()).Round(time.Millisecond),
		drain.Round(time.Millisecond), reconnect.Round(time.Millisecond), outage.Round(time.Millisecond), drained.Load(), restartCycles)

	// Only a request in flight when its daemon died may fail, saying it may have run;
	// a daemon that drains finishes those, so then nothing fails.
	for _, err := range load.failures {
		if !errors.Is(err, ErrMayHaveRun) || !errors.Is(err, ErrClosed) || sig == syscall.SIGTERM && drained.Load() == restartCycles {
			t.Errorf("call failed: %v", err)
		}
	}
	if errs := h.disconnected(); len(errs) != restartCycles {
		t.Errorf("disconnect handler called %d times, want %d: %v", len(errs), restartCycles, errs)
	}
	hctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if health, err := c.Health(hctx); err != nil || !health.Ready {
		t.Errorf("Health after the restarts: %+v, %v", health, err)
	}
	c.Close()
	settle(t, before)
}

// TestHealthAcrossRestart: Health asked while the daemon is down answers once the new
// daemon is up, within its context.
func TestHealthAcrossRestart(t *testing.T) {
	needDaemon(t)
	dir := t.TempDir()
	d, err := startDaemon(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.kill(syscall.SIGKILL) })
	c, err := Dial(testCtx(t), d.socket, WithReconnectWait(10*time.Millisecond), WithMaxReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	first := c.Session()
	d.kill(syscall.SIGKILL)
	eventually(t, "the session to end", func() bool { return c.sess().ended() })
	// While nothing listens: the context's end, and why.
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	_, err = c.Health(short)
	cancel()
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Health with no daemon: %v, want ErrUnavailable and DeadlineExceeded", err)
	}
	healthy := make(chan error, 1)
	go func() {
		h, err := c.Health(testCtx(t))
		if err == nil && !h.Ready {
			err = fmt.Errorf("not ready: %s", h.Reason)
		}
		healthy <- err
	}()
	d, err = startDaemonOn(dir, d.socket)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-healthy; err != nil {
		t.Fatalf("Health across the restart: %v", err)
	}
	if c.Session() == first {
		t.Fatal("still the first session")
	}
}
