package floor

import (
	"runtime"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Memcpy measures copy(dst, src) of size bytes between two buffers already faulted in:
// the bandwidth of the one copy a transport cannot avoid. Each sample copies enough times
// to last a few microseconds and records the time per copy in picoseconds (HDR
// histograms hold integers; nanoseconds would round a 16-byte copy to 0 or 1).
func Memcpy(size int, lim Limits) (h *hdrhistogram.Histogram, batch int) {
	src := make([]byte, size)
	dst := make([]byte, size)
	for i := range src {
		src[i] = byte(i)
	}
	copy(dst, src)
	// Collect the previous sizes' buffers now, so the collector's background workers do
	// not share the two cores with the copies being timed.
	runtime.GC()
	batch = max(1, (64<<10)/size)
	h = newHist()
	start := time.Now()
	for i := 0; i < lim.Warmup+lim.MaxIters; i++ {
		// At least 20 samples (large copies take milliseconds), at most 5 s.
		el := time.Since(start)
		if i >= lim.Warmup+20 && el > lim.Duration || el > 5*time.Second {
			break
		}
		t0 := time.Now()
		for j := 0; j < batch; j++ {
			copy(dst, src)
		}
		d := time.Since(t0)
		if i >= lim.Warmup {
			_ = h.RecordValue(max(1, int64(d)*1000/int64(batch)))
		}
	}
	runtime.KeepAlive(dst) // the copies must not be optimized away
	return h, batch
}
