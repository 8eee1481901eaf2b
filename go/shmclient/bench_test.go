package shmclient

import (
	"context"
	"sort"
	"testing"
	"time"
)

// go test -run '^$' -bench . ./shmclient  (needs the daemon TestMain starts)

func benchClient(b *testing.B) *Client {
	b.Helper()
	if daemonErr != nil {
		b.Fatalf("benchmark needs the tensord daemon: %v", daemonErr)
	}
	c, err := Dial(context.Background(), "")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// reportPercentiles adds p50/p99 of the per-call latencies to the benchmark output.
func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
}

func BenchmarkInfer4KiB(b *testing.B) {
	c := benchClient(b)
	ctx := context.Background()
	x := FromUint8("x", []int64{4096}, make([]byte, 4096))
	lat := make([]time.Duration, 0, b.N)
	b.SetBytes(4096)
	for b.Loop() {
		t0 := time.Now()
		if _, err := c.Infer(ctx, "identity", x); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportPercentiles(b, lat)
}

func BenchmarkZeroCopy4MiB(b *testing.B) {
	c := benchClient(b)
	ctx := context.Background()
	spec := TensorSpec{Name: "x", DType: F32, Shape: []int64{1 << 20}}
	b.SetBytes(4 << 20)
	for b.Loop() {
		req, err := c.NewRequest(ctx, "identity", spec)
		if err != nil {
			b.Fatal(err)
		}
		req.Input(0).Float32s()[0] = 1
		resp, err := req.Do(ctx)
		if err != nil {
			b.Fatal(err)
		}
		resp.Release()
	}
}

func BenchmarkInferParallel4KiB(b *testing.B) {
	c := benchClient(b)
	ctx := context.Background()
	b.SetBytes(4096)
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		x := FromUint8("x", []int64{4096}, make([]byte, 4096))
		for pb.Next() {
			if _, err := c.Infer(ctx, "identity", x); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
