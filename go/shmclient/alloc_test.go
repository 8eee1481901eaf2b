package shmclient

import (
	"context"
	"testing"
	"time"
)

// The zero-copy path (NewRequest, Do, Release) allocates nothing once the Client has a
// call of the request's shape to reuse (call.go). These tests count allocations
// process-wide (testing.AllocsPerRun), so the peer is the fake daemon, whose own steady
// state allocates nothing either; TestZeroCopyAllocsThroughDaemon checks the same against
// the real daemon, whose allocations are in another process.

func zeroCopyRound(t testing.TB, c *Client, ctx context.Context, spec TensorSpec) {
	req, err := c.NewRequest(ctx, "identity", spec)
	if err != nil {
		t.Fatal(err)
	}
	in := req.Input(0).Float32s()
	in[0], in[len(in)-1] = 1, 2
	resp, err := req.Do(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if out := resp.Outputs[0].Float32s(); out[0] != 1 || out[len(out)-1] != 2 {
		t.Fatalf("identity returned %v...%v", out[0], out[len(out)-1])
	}
	resp.Release()
}

func checkZeroCopyAllocs(t *testing.T, c *Client) {
	ctx := context.Background()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
	}{{"background", ctx}, {"cancellable", cctx}} {
		// The spec is built in the loop, as callers write it: its shape must not escape.
		round := func() { zeroCopyRound(t, c, tc.ctx, TensorSpec{Name: "x", DType: F32, Shape: []int64{1024}}) } // 4 KiB
		if n := testing.AllocsPerRun(500, round); n != 0 {
			t.Errorf("zero-copy round trip, %s context: %v allocations, want 0", tc.name, n)
		}
	}
	// Infer allocates its results only: the slice of outputs, and one block per output.
	data := make([]float32, 1024)
	if n := testing.AllocsPerRun(500, func() {
		if _, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{1024}, data)); err != nil {
			t.Fatal(err)
		}
	}); n > 2 {
		t.Errorf("Infer: %v allocations, want 2 (the copies it returns)", n)
	}
}

func TestZeroCopyAllocs(t *testing.T) {
	checkZeroCopyAllocs(t, dialFake(t))
}

func TestZeroCopyAllocsThroughDaemon(t *testing.T) {
	checkZeroCopyAllocs(t, dialTest(t))
}

// TestZeroCopyAllocsPipelined: requests in flight at once, answered to each other's
// Waits (reader.go's hand-over), allocate nothing either.
func TestZeroCopyAllocsPipelined(t *testing.T) {
	c := dialFake(t)
	ctx := context.Background()
	spec := TensorSpec{Name: "x", DType: U8, Shape: []int64{100}}
	var reqs [4]Request
	round := func() {
		for i := range reqs {
			req, err := c.NewRequest(ctx, "identity", spec)
			if err != nil {
				t.Fatal(err)
			}
			if err := req.Send(ctx); err != nil {
				t.Fatal(err)
			}
			reqs[i] = req
		}
		for i := len(reqs) - 1; i >= 0; i-- {
			resp, err := reqs[i].Wait(ctx)
			if err != nil {
				t.Fatal(err)
			}
			resp.Release()
		}
	}
	if n := testing.AllocsPerRun(200, round); n != 0 {
		t.Errorf("4 pipelined requests: %v allocations, want 0", n)
	}
}
