package shmclient

import (
	"context"
	"testing"
)

func TestStatsCountHighPriorityRequests(t *testing.T) {
	c := dialTest(t)
	ctx := WithPriority(testCtx(t), PriorityHigh)
	before := mlpServed(t, c)
	x := make([]float32, 16)
	for i := 0; i < 3; i++ {
		if _, err := c.Infer(ctx, "mlp", FromFloat32("x", []int64{1, 16}, x)); err != nil {
			t.Fatal(err)
		}
	}
	// The daemon counts a request as served just after writing its response, so the
	// count may lag the last Infer by a moment.
	var mlp *ModelStats
	eventually(t, "mlp's counters to count 3 more requests", func() bool {
		stats, err := c.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		mlp = nil
		for i := range stats {
			if stats[i].Name == "mlp" {
				mlp = &stats[i]
			}
		}
		if mlp == nil {
			t.Fatalf("no mlp in %+v", stats)
		}
		return mlp.Served >= before+3
	})
	if mlp.Served != before+3 || mlp.Batches == 0 || mlp.MeanBatchSize() < 1 || mlp.Queued != 0 {
		t.Fatalf("mlp stats after 3 requests (served %d before): %+v", before, *mlp)
	}
}

func mlpServed(t *testing.T, c *Client) uint64 {
	t.Helper()
	stats, err := c.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stats {
		if s.Name == "mlp" {
			return s.Served
		}
	}
	return 0
}

func TestPriorityIsWrittenOnlyWhenHigh(t *testing.T) {
	for _, p := range []Priority{PriorityNormal, PriorityHigh} {
		d := requestDesc{Model: "m", Inputs: []tensorRef{{Name: "x", DType: "f32", Shape: []uint64{1}, Offset: 64, NBytes: 4}}, Priority: uint64(p)}
		b := appendRequestDesc(nil, &d)
		if len(b) != requestDescLen(&d) {
			t.Fatalf("priority %d: encoded %d bytes, sized %d", p, len(b), requestDescLen(&d))
		}
		got, err := decodeRequestDesc(b)
		if err != nil || got.Priority != uint64(p) || (p == PriorityNormal && b[0] != 0x83) {
			t.Fatalf("priority %d: %x decoded to %+v, %v", p, b, got, err)
		}
	}
}
