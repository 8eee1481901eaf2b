package shmclient

import (
	"context"
	"runtime"
	"sort"
	"syscall"
	"testing"
	"time"
)

// go test -run '^$' -bench . ./shmclient  (needs the daemon TestMain starts; the Fake
// benchmarks do not)

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

// ns/op is the round trip through the daemon; proc-cpu-ns/op and call-cpu-ns/op are
// the client's CPU per call (the whole process, and the calling thread), excluding the
// time it sleeps waiting for the daemon.
func BenchmarkInfer4KiB(b *testing.B)    { benchInfer(b, benchClient(b)) }
func BenchmarkZeroCopy4KiB(b *testing.B) { benchZeroCopy(b, benchClient(b), 1024) }

func BenchmarkInferLatency4KiB(b *testing.B) {
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
	b.ReportAllocs()
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

// cpuMeter measures CPU time (user + system) of the process and of the calling thread,
// which the benchmark pins to its goroutine: the client's own work on a call, without the
// time it sleeps waiting for the daemon (which costs no CPU) and, for the thread figure,
// without other goroutines (the fake daemon's, the runtime's).
type cpuMeter struct {
	self, thread syscall.Rusage
}

const rusageThread = 1 // RUSAGE_THREAD

func startCPU(b *testing.B) *cpuMeter {
	runtime.LockOSThread() // until report
	m := &cpuMeter{}
	syscall.Getrusage(syscall.RUSAGE_SELF, &m.self)
	syscall.Getrusage(rusageThread, &m.thread)
	return m
}

func cpuTime(r *syscall.Rusage) time.Duration {
	return time.Duration(r.Utime.Nano() + r.Stime.Nano())
}

func (m *cpuMeter) report(b *testing.B) {
	var self, thread syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &self)
	syscall.Getrusage(rusageThread, &thread)
	runtime.UnlockOSThread()
	n := float64(b.N)
	b.ReportMetric(float64(cpuTime(&self)-cpuTime(&m.self))/n, "proc-cpu-ns/op")
	b.ReportMetric(float64(cpuTime(&thread)-cpuTime(&m.thread))/n, "call-cpu-ns/op")
	b.ReportMetric(float64(thread.Utime.Nano()-m.thread.Utime.Nano())/n, "call-user-ns/op")
	b.ReportMetric(float64(thread.Stime.Nano()-m.thread.Stime.Nano())/n, "call-sys-ns/op")
}

func benchZeroCopy(b *testing.B, c *Client, elems int64) {
	ctx := context.Background()
	spec := TensorSpec{Name: "x", DType: F32, Shape: []int64{elems}}
	b.SetBytes(4 * elems)
	b.ReportAllocs()
	zeroCopyRound(b, c, ctx, spec) // the call's buffers
	m := startCPU(b)
	for b.Loop() {
		zeroCopyRound(b, c, ctx, spec)
	}
	m.report(b)
}

func benchInfer(b *testing.B, c *Client) {
	ctx := context.Background()
	x := FromUint8("x", []int64{4096}, make([]byte, 4096))
	b.SetBytes(4096)
	b.ReportAllocs()
	m := startCPU(b)
	for b.Loop() {
		if _, err := c.Infer(ctx, "identity", x); err != nil {
			b.Fatal(err)
		}
	}
	m.report(b)
}

// The fake daemon answers in the same process, so ns/op and proc-cpu include its work;
// call-cpu is the client's alone.
func BenchmarkFakeZeroCopy4KiB(b *testing.B) { benchZeroCopy(b, dialFake(b), 1024) }
func BenchmarkFakeInfer4KiB(b *testing.B)    { benchInfer(b, dialFake(b)) }
