package shmclient

import (
	"testing"
	"time"
)

// Responses that do not fit the response ring wait in the daemon ("parked") until the
// client frees space. A parked response must own its bytes: the request record it came
// from is released at once, and the client reuses that ring space for its next
// requests. Each request carries its own number, so a response holding another
// request's bytes is caught (issue 15, defect 1).
func TestParkedResponsesKeepTheirOwnBytes(t *testing.T) {
	c := dialTest(t, WithRingSize(64<<10, 64<<10))
	ctx := testCtx(t)
	const n, size = 12, 16 << 10
	reqs := make([]Request, n)
	for i := range reqs {
		req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: U8, Shape: []int64{size}})
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		data := req.Input(0).Data
		for k := range data {
			data[k] = byte(i + 1)
		}
		if err := req.Send(ctx); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		reqs[i] = req
	}
	time.Sleep(100 * time.Millisecond) // the daemon takes (and releases) every request first
	for i, req := range reqs {
		resp, err := req.Wait(ctx)
		if err != nil {
			t.Fatalf("wait %d: %v", i, err)
		}
		y := resp.Outputs[0].Data
		for k, b := range y {
			if b != byte(i+1) {
				t.Errorf("request %d: byte %d is %d, want %d (another request's bytes)", i, k, b, i+1)
				break
			}
		}
		if len(y) != size {
			t.Errorf("request %d: %d bytes back, want %d", i, len(y), size)
		}
		resp.Release()
	}
}
