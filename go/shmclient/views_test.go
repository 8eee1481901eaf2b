package shmclient

import "testing"

// TestNoStaleViews: once its memory is given back, a Response or Request hands out no
// views, so a use after Release, Send or Abandon fails loudly instead of reading or
// writing the bytes of a later request.
func TestNoStaleViews(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	spec := TensorSpec{Name: "x", DType: F32, Shape: []int64{3}}

	req, err := c.NewRequest(ctx, "identity", spec)
	if err != nil {
		t.Fatal(err)
	}
	copy(req.Input(0).Float32s(), []float32{1, 2, 3})
	resp, err := req.Do(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if req.NumInputs() != 0 {
		t.Errorf("NumInputs after Do: %d, want 0", req.NumInputs())
	}
	mustPanic(t, "Input after Do", func() { req.Input(0) })
	if y, ok := resp.Output("y"); !ok || len(y.Float32s()) != 3 {
		t.Fatalf("output before Release: %v, %v", y, ok)
	}
	resp.Release()
	if resp.Outputs != nil {
		t.Errorf("Outputs after Release: %v", resp.Outputs)
	}
	if y, ok := resp.Output("y"); ok {
		t.Errorf("Output after Release found %v", y)
	}
	resp.Release() // still a no-op

	abandoned, err := c.NewRequest(ctx, "identity", spec)
	if err != nil {
		t.Fatal(err)
	}
	abandoned.Abandon()
	if abandoned.NumInputs() != 0 {
		t.Errorf("NumInputs after Abandon: %d, want 0", abandoned.NumInputs())
	}
	mustPanic(t, "Input after Abandon", func() { abandoned.Input(0) })

	// The session goes on, and the rings are clean.
	if _, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{1}, []float32{1})); err != nil {
		t.Fatal(err)
	}
	checkRingsIdle(t, c)
}
