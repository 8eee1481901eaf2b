package shmclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func randomTensor(rng *mrand.Rand, name string, dt DType, shape []int64) Tensor {
	n, _ := numElements(shape)
	data := alignedCopy(make([]byte, n*int64(dt.Size())))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	t := Tensor{Name: name, DType: dt, Shape: shape, Data: data}
	if dt == Bool {
		for i := range data {
			data[i] &= 1
		}
	}
	return t
}

func sameTensor(t *testing.T, got, want Tensor) {
	t.Helper()
	if got.DType != want.DType || fmt.Sprint(got.Shape) != fmt.Sprint(want.Shape) {
		t.Fatalf("got %v%v, want %v%v", got.DType, got.Shape, want.DType, want.Shape)
	}
	if !bytes.Equal(got.Data, want.Data) {
		t.Fatalf("%v%v: data differs (%d vs %d bytes)", want.DType, want.Shape, len(got.Data), len(want.Data))
	}
}

var roundTripCases = []struct {
	dt    DType
	shape []int64
}{
	{F32, []int64{}},
	{F32, []int64{1}},
	{F32, []int64{3, 5}},
	{F32, []int64{1024, 1024}}, // 4 MiB
	{I64, []int64{7}},
	{I64, []int64{2, 3, 4}},
	{I64, []int64{512, 1024}}, // 4 MiB
	{U8, []int64{0}},
	{U8, []int64{13}},
	{U8, []int64{3 << 20}}, // 3 MiB
	{BF16, []int64{2, 2}},
	{BF16, []int64{1, 1, 3, 333}},
	{BF16, []int64{2048, 1024}}, // 4 MiB
	{F16, []int64{17}},
	{F64, []int64{4, 4}},
	{I32, []int64{9}},
	{I16, []int64{3, 3}},
	{I8, []int64{100}},
	{Bool, []int64{10}},
}

func TestIdentityInfer(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	rng := mrand.New(mrand.NewPCG(1, 1))
	for _, tc := range roundTripCases {
		t.Run(fmt.Sprintf("%v%v", tc.dt, tc.shape), func(t *testing.T) {
			in := randomTensor(rng, "x", tc.dt, tc.shape)
			out, err := c.Infer(ctx, "identity", in)
			if err != nil {
				t.Fatal(err)
			}
			if len(out) != 1 || out[0].Name != "y" {
				t.Fatalf("outputs %v", out)
			}
			sameTensor(t, out[0], in)
		})
	}
}

func TestIdentityZeroCopy(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	rng := mrand.New(mrand.NewPCG(2, 2))
	for _, tc := range roundTripCases {
		t.Run(fmt.Sprintf("%v%v", tc.dt, tc.shape), func(t *testing.T) {
			want := randomTensor(rng, "x", tc.dt, tc.shape)
			req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: tc.dt, Shape: tc.shape})
			if err != nil {
				t.Fatal(err)
			}
			in := req.Input(0)
			if uintptrOf(in.Data)%64 != 0 {
				t.Fatalf("input data not 64-byte aligned")
			}
			copy(in.Data, want.Data)
			resp, err := req.Do(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Release()
			y, ok := resp.Output("y")
			if !ok {
				t.Fatalf("no output y in %v", resp.Outputs)
			}
			if len(y.Data) > 0 && uintptrOf(y.Data)%64 != 0 {
				t.Fatalf("output view not 64-byte aligned")
			}
			sameTensor(t, y, want)
		})
	}
}

func TestTypedAccessorsThroughDaemon(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	f := []float32{1.5, -2, float32(math.Inf(1)), 3.25}
	bf := make([]uint16, len(f))
	for i, v := range f {
		bf[i] = Float32ToBFloat16(v)
	}
	out, err := c.Infer(ctx, "identity", FromBFloat16Bits("x", []int64{4}, bf))
	if err != nil {
		t.Fatal(err)
	}
	if got := out[0].Float32sFromHalf(); fmt.Sprint(got) != fmt.Sprint(f) {
		t.Fatalf("bf16 round trip %v, want %v", got, f)
	}
	out, err = c.Infer(ctx, "identity", FromInt64("x", []int64{2, 2}, []int64{math.MinInt64, -1, 0, math.MaxInt64}))
	if err != nil {
		t.Fatal(err)
	}
	if got := out[0].Int64s(); fmt.Sprint(got) != fmt.Sprint([]int64{math.MinInt64, -1, 0, math.MaxInt64}) {
		t.Fatalf("i64 round trip %v", got)
	}
	out, err = c.Infer(ctx, "identity", FromStrings("x", nil, []string{"héllo", "", "wörld"}))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := out[0].Strings(); err != nil || fmt.Sprint(got) != "[héllo  wörld]" {
		t.Fatalf("bytes round trip %q, %v", got, err)
	}
}

// mlpReference computes the built-in mlp on x (rows of 16) in float64 from the model's
// own weights, through the daemon's Python: the reference cannot drift from the model,
// and it depends on no BLAS kernel's summation order.
func mlpReference(t *testing.T, x []float32) []float64 {
	t.Helper()
	const script = `
import json, sys, torch
from tensord.models.builtin import build_mlp
w = {k: v.double() for k, v in build_mlp().state_dict().items()}
x = torch.tensor(json.load(sys.stdin), dtype=torch.float64).reshape(-1, 16)
y = torch.relu(x @ w["l1.weight"].T + w["l1.bias"]) @ w["l2.weight"].T + w["l2.bias"]
json.dump(y.flatten().tolist(), sys.stdout)
`
	in, err := json.Marshal(x)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(pythonPath(), "-c", script)
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("computing the mlp reference with %s: %v\n%s", pythonPath(), err, stderr.Bytes())
	}
	var y []float64
	if err := json.Unmarshal(out, &y); err != nil || len(y) != len(x)/16*4 {
		t.Fatalf("mlp reference: %d values (%v) from %q", len(y), err, out)
	}
	return y
}

// checkClose compares float32 results with a float64 reference. Float results are not
// bit-identical across batch positions or BLAS kernels (a remainder row may take another
// kernel), so the tolerance covers float32 rounding: about 1e-6 relative is seen, and a
// wrong weight or row would be off by far more.
func checkClose(t *testing.T, what string, got []float32, want []float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i, g := range got {
		if d := math.Abs(float64(g) - want[i]); !(d <= 1e-5*(1+math.Abs(want[i]))) {
			t.Fatalf("%s: value %d (row %d) is %v, want %v (off by %.3g)\n got %v\nwant %v", what, i, i/4, g, want[i], d, got, want)
		}
	}
}

// TestMLP runs a batch through mlp: five identical rows, which BLAS may compute with
// different kernels (one ulp apart on some CPUs), and distinct rows.
func TestMLP(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	const rows = 8
	x := make([]float32, rows*16)
	for i := range x {
		r, j := i/16, i%16
		if r < 5 {
			x[i] = float32(j) / 8
		} else {
			x[i] = float32((r*7+j*3)%11)/4 - 1
		}
	}
	out, err := c.Infer(ctx, "mlp", FromFloat32("x", []int64{rows, 16}, x))
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 || out[0].Name != "y" || out[0].DType != F32 || fmt.Sprint(out[0].Shape) != fmt.Sprint([]int64{rows, 4}) {
		t.Fatalf("mlp output %v %v %v", out[0].Name, out[0].DType, out[0].Shape)
	}
	checkClose(t, "mlp", out[0].Float32s(), mlpReference(t, x))
}

func TestConcurrentRequests(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	const goroutines, perG = 16, 500
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(g), 7))
			for i := 0; i < perG; i++ {
				n := 1 + rng.IntN(2048)
				data := make([]int32, n)
				for j := range data {
					data[j] = int32(g<<24 | i<<12 | j)
				}
				if i%2 == 0 {
					out, err := c.Infer(ctx, "identity", FromInt32("x", []int64{int64(n)}, data))
					if err != nil {
						errs <- fmt.Errorf("goroutine %d request %d: %w", g, i, err)
						return
					}
					if !bytes.Equal(out[0].Data, bytesOf(data)) {
						errs <- fmt.Errorf("goroutine %d request %d: got someone else's data", g, i)
						return
					}
					continue
				}
				req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: I32, Shape: []int64{int64(n)}})
				if err != nil {
					errs <- err
					return
				}
				copy(req.Input(0).Int32s(), data)
				resp, err := req.Do(ctx)
				if err != nil {
					errs <- fmt.Errorf("goroutine %d request %d: %w", g, i, err)
					return
				}
				ok := bytes.Equal(resp.Outputs[0].Data, bytesOf(data))
				resp.Release()
				if !ok {
					errs <- fmt.Errorf("goroutine %d request %d: got someone else's data", g, i)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestUnknownModel(t *testing.T) {
	c := dialTest(t)
	_, err := c.Infer(testCtx(t), "no-such-model", FromFloat32("x", []int64{1}, []float32{1}))
	var derr *DaemonError
	if !errors.Is(err, ErrUnknownModel) || !errors.As(err, &derr) || derr.Code != CodeUnknownModel {
		t.Fatalf("got %v, want ErrUnknownModel from the daemon", err)
	}
	// The session goes on.
	if _, err := c.Infer(testCtx(t), "identity", FromFloat32("x", []int64{1}, []float32{1})); err != nil {
		t.Fatal(err)
	}
}

func TestBadInputChecked(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	for name, in := range map[string]Tensor{
		"wrong dim":   FromFloat32("x", []int64{2, 15}, make([]float32, 30)),
		"wrong dtype": FromFloat64("x", []int64{1, 16}, make([]float64, 16)),
		"wrong rank":  FromFloat32("x", []int64{16}, make([]float32, 16)),
		"wrong name":  FromFloat32("z", []int64{1, 16}, make([]float32, 16)),
		"short data":  FromFloat32("x", []int64{2, 16}, make([]float32, 16)),
	} {
		_, err := c.Infer(ctx, "mlp", in)
		if !errors.Is(err, ErrBadInput) {
			t.Errorf("%s: got %v, want ErrBadInput", name, err)
		}
		var derr *DaemonError
		if errors.As(err, &derr) {
			t.Errorf("%s: checked by the daemon, want the client to catch it: %v", name, err)
		}
	}
	// No metadata is cached for an unknown model, so only the daemon can tell.
	_, err := c.Infer(ctx, "mlp", FromFloat32("x", []int64{1, 16}, make([]float32, 16)), FromFloat32("x2", []int64{1}, []float32{1}))
	if !errors.Is(err, ErrBadInput) {
		t.Errorf("extra input: got %v", err)
	}
}

func TestTooLarge(t *testing.T) {
	c := dialTest(t, WithRingSize(65536, 65536))
	if rq, rs := c.RingSizes(); rq != 65536 || rs != 65536 {
		t.Fatalf("ring sizes %d/%d", rq, rs)
	}
	_, err := c.Infer(testCtx(t), "identity", FromUint8("x", []int64{100000}, make([]byte, 100000)))
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "WithRingSize(131072") {
		t.Fatalf("got %v, want ErrTooLarge naming WithRingSize(131072, ...)", err)
	}
	if *c.sess().req.r.tail != 0 {
		t.Fatal("something was written for a record that cannot fit")
	}
	if _, err := c.Infer(testCtx(t), "identity", FromUint8("x", []int64{1000}, make([]byte, 1000))); err != nil {
		t.Fatal(err)
	}

	// A response that cannot fit the response ring is the daemon's to refuse.
	c2 := dialTest(t, WithRingSize(1<<20, 65536))
	_, err = c2.Infer(testCtx(t), "identity", FromUint8("x", []int64{100000}, make([]byte, 100000)))
	var derr *DaemonError
	if !errors.Is(err, ErrTooLarge) || !errors.As(err, &derr) {
		t.Fatalf("got %v, want the daemon's TOO_LARGE", err)
	}
	if SafeToRetry(err) || !errors.Is(err, ErrMayHaveRun) {
		t.Fatalf("the daemon's TOO_LARGE for a response comes after the model ran: got SafeToRetry %v", SafeToRetry(err))
	}
	if _, err := c2.Infer(testCtx(t), "identity", FromUint8("x", []int64{1000}, make([]byte, 1000))); err != nil {
		t.Fatal(err)
	}
}

// TestCancel checks that a deadline is honoured while waiting for request-ring space,
// and that cancelling a published request whose response cannot be written yet (the
// response ring is full) returns at once and that the late response is released.
func TestCancel(t *testing.T) {
	c := dialTest(t, WithRingSize(65536, 65536))
	ctx := testCtx(t)

	// A 60 KB reservation fills the 64 KiB request ring; nothing may be written for the
	// request whose deadline passes while it waits for space.
	block, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: U8, Shape: []int64{60000}})
	if err != nil {
		t.Fatal(err)
	}
	tail := *c.sess().req.r.tail
	dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	// Space never comes while block is held: returning at all is honouring the deadline.
	_, err = c.Infer(dctx, "identity", FromUint8("x", []int64{30000}, make([]byte, 30000)))
	dcancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want context.DeadlineExceeded", err)
	}
	if *c.sess().req.r.tail != tail {
		t.Fatal("a request whose deadline passed while waiting for space was written")
	}
	block.Abandon()

	// One 40 KB response held: the next one cannot be written until it is released.
	payload := FromUint8("x", []int64{40000}, make([]byte, 40000))
	req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: U8, Shape: []int64{40000}})
	if err != nil {
		t.Fatal(err)
	}
	held, err := req.Do(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := c.Infer(cctx, "identity", payload)
		done <- err
	}()
	// Cancel once the request is published and its caller waits for the response, which
	// cannot come while held is: returning at all is returning at once.
	eventually(t, "the request to be sent and waited for", func() bool {
		s := c.sess()
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.inFlight == 1 && s.waiters == 1
	})
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Infer did not return after cancel")
	}

	// Releasing the held response lets the daemon write the cancelled request's response,
	// which the client must release by itself: otherwise the ring stays pinned and these
	// requests, each needing most of it, would stall.
	held.Release()
	for i := 0; i < 5; i++ {
		ictx, icancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := c.Infer(ictx, "identity", payload)
		icancel()
		if err != nil {
			t.Fatalf("after cancel (request %d): %v", i, err)
		}
	}
}

func TestDeadlineAlreadyPassed(t *testing.T) {
	c := dialTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), -time.Second)
	defer cancel()
	_, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{1}, []float32{1}))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
}

func TestViewsOutliveClose(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	want := []float32{1, 2, 3}
	req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: F32, Shape: []int64{3}})
	if err != nil {
		t.Fatal(err)
	}
	copy(req.Input(0).Float32s(), want)
	resp, err := req.Do(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if got := resp.Outputs[0].Float32s(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("view after Close: %v", got)
	}
	if _, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{1}, []float32{1})); !errors.Is(err, ErrClosed) {
		t.Fatalf("Infer after Close: %v", err)
	}
	if err := c.Ping(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Ping after Close: %v", err)
	}
	if c.sess().seg.mem == nil {
		t.Fatal("segment unmapped while a view is held")
	}
	resp.Release()
	if c.sess().seg.mem != nil {
		t.Fatal("segment still mapped after the last view was released")
	}
}

// TestDaemonKilled SIGKILLs a daemon of its own while requests are in flight, with a
// Client that does not reconnect (reconnect_test.go has those that do).
func TestDaemonKilled(t *testing.T) {
	d, c := ownDaemon(t, WithReconnect(false))
	ctx := testCtx(t)
	held, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{2}, []float32{4, 5}))
	if err != nil {
		t.Fatal(err)
	}
	req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: F32, Shape: []int64{2}})
	if err != nil {
		t.Fatal(err)
	}
	heldResp, err := req.Do(ctx)
	if err != nil {
		t.Fatal(err)
	}

	const workers = 4
	errs := make(chan error, workers)
	var served atomic.Int64
	for w := 0; w < workers; w++ {
		go func() {
			for {
				if _, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{256}, make([]float32, 256))); err != nil {
					errs <- err
					return
				}
				served.Add(1)
			}
		}()
	}
	// Kill while the workers are busy: every one of them has been answered a few times.
	eventually(t, "the workers to be answered", func() bool { return served.Load() >= 4*workers })
	d.kill(syscall.SIGKILL)
	// The calls wait on nothing the dead daemon could still give: failing at all (not
	// at ctx's 60 s deadline) is failing promptly.
	for w := 0; w < workers; w++ {
		select {
		case err := <-errs:
			if !errors.Is(err, ErrClosed) {
				t.Errorf("in-flight call: %v, want ErrClosed", err)
			}
			if !strings.Contains(err.Error(), "daemon closed the connection") {
				t.Errorf("error does not say what happened: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("in-flight call did not fail after the daemon died")
		}
	}
	// Later calls fail with ErrClosed, not at their deadline.
	lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
	defer lcancel()
	if _, err := c.Infer(lctx, "identity", FromFloat32("x", []int64{1}, []float32{1})); !errors.Is(err, ErrClosed) {
		t.Errorf("later Infer: %v", err)
	}
	if _, err := c.NewRequest(lctx, "identity", TensorSpec{Name: "x", DType: F32, Shape: []int64{1}}); !errors.Is(err, ErrClosed) {
		t.Errorf("later NewRequest: %v", err)
	}
	if err := c.Ping(lctx); !errors.Is(err, ErrClosed) {
		t.Errorf("later Ping: %v", err)
	}
	// Copies and views stay readable: nothing is unmapped under the caller.
	if fmt.Sprint(held[0].Float32s()) != "[4 5]" || len(heldResp.Outputs[0].Float32s()) != 2 {
		t.Fatal("outputs unreadable after the daemon died")
	}
	heldResp.Release()
	c.Close()
	if c.sess().seg.mem != nil {
		t.Fatal("segment still mapped after Close and the last release")
	}
	// Nothing of a session has a name (SPEC §2.5): once the client lets go of its
	// descriptors, nothing of the dead daemon's session is left.
	for i := range c.sess().seg.efds {
		if c.sess().seg.efds[i].fd >= 0 {
			t.Fatalf("eventfd %d still open after Close and the last release", i)
		}
	}
}

// TestDaemonShutdown stops a daemon of its own with SIGTERM: a client that does not
// reconnect is told goodbye and every call fails with ErrClosed (and ErrShuttingDown,
// which says why).
func TestDaemonShutdown(t *testing.T) {
	d, c := ownDaemon(t, WithReconnect(false))
	ctx := testCtx(t)
	if _, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{1}, []float32{1})); err != nil {
		t.Fatal(err)
	}
	d.kill(syscall.SIGTERM)
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("session still open after the daemon stopped")
	}
	if err := c.Err(); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("session ended with %v, want ErrClosed and ErrShuttingDown", err)
	}
	_, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{1}, []float32{1}))
	if !errors.Is(err, ErrClosed) || !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("got %v, want ErrClosed and ErrShuttingDown", err)
	}
	if err := c.Ping(ctx); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("Ping: %v, want ErrClosed and ErrShuttingDown", err)
	}
}

// eventually polls cond until it holds, failing the test if it does not within 10 s: tests
// wait on the state they need rather than sleeping and hoping it was reached.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// ownDaemon starts a daemon for one test (which may kill it) and dials it; both are
// cleaned up when the test ends.
func ownDaemon(t *testing.T, opts ...Option) (*daemonProc, *Client) {
	t.Helper()
	needDaemon(t)
	d, err := startDaemon(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.kill(syscall.SIGKILL) })
	c, err := Dial(testCtx(t), d.socket, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return d, c
}
