// Package harness runs one benchmark point (transport, model, payload size, callers) in
// goroutines or in separate processes and summarises the latencies from HDR histograms.
package harness

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"

	"github.com/tensord/tensord/bench/internal/transport"
)

// Modes of running concurrent callers.
const (
	Goroutines = "goroutines" // one process, callers share the transport's connection
	Processes  = "processes"  // one process (and connection) per caller
)

// Point is one cell of the matrix.
type Point struct {
	Transport string        `json:"transport"`
	Label     string        `json:"label"` // e.g. "tensord-copy spin=100us"; defaults to Transport
	Addr      string        `json:"addr"`
	Spin      time.Duration `json:"spin_ns"`
	Model     string        `json:"model"`
	Size      int           `json:"size"`
	Callers   int           `json:"callers"`
	Mode      string        `json:"mode"`
	// Each caller warms up for Warmup, then measures until Duration has passed and it has
	// made at least MinIters calls, or until MaxIters calls or HardCap, whichever first.
	Warmup   time.Duration `json:"warmup_ns"`
	Duration time.Duration `json:"duration_ns"`
	MinIters int           `json:"min_iters"`
	MaxIters int           `json:"max_iters"`
	HardCap  time.Duration `json:"hard_cap_ns"`
	// Phase and Round tag points of the interleaved headline phase (run.py).
	Phase string `json:"phase,omitempty"`
	Round int    `json:"round,omitempty"`
}

// Result is a point's measurement. Latencies are in microseconds.
type Result struct {
	Point
	Count         int64   `json:"count"`
	Errors        int64   `json:"errors"`
	FirstError    string  `json:"first_error,omitempty"`
	ElapsedS      float64 `json:"elapsed_s"`
	P50           float64 `json:"p50_us"`
	P90           float64 `json:"p90_us"`
	P99           float64 `json:"p99_us"`
	P999          float64 `json:"p999_us"`
	Max           float64 `json:"max_us"`
	Mean          float64 `json:"mean_us"`
	Min           float64 `json:"min_us"`
	ThroughputRPS float64 `json:"throughput_rps"`
	// GoodputMBps is payload bytes per second in each direction (identity returns what it
	// was sent): Count*Size/Elapsed.
	GoodputMBps float64 `json:"goodput_mbps"`
	Histogram   string  `json:"hdr"` // HdrHistogram V2 compressed, base64, nanoseconds
}

// NewHistogram is the histogram every measurement uses: 1 ns to 10 min, 3 digits.
func NewHistogram() *hdrhistogram.Histogram {
	return hdrhistogram.New(1, int64(10*time.Minute), 3)
}

// Summarise fills a Result's statistics from h (nanoseconds).
func Summarise(r *Result, h *hdrhistogram.Histogram) error {
	us := func(ns int64) float64 { return float64(ns) / 1e3 }
	r.Count = h.TotalCount()
	if r.Count > 0 {
		r.P50 = us(h.ValueAtQuantile(50))
		r.P90 = us(h.ValueAtQuantile(90))
		r.P99 = us(h.ValueAtQuantile(99))
		r.P999 = us(h.ValueAtQuantile(99.9))
		r.Max = us(h.Max())
		r.Min = us(h.Min())
		r.Mean = h.Mean() / 1e3
	}
	if r.ElapsedS > 0 {
		r.ThroughputRPS = float64(r.Count) / r.ElapsedS
		r.GoodputMBps = float64(r.Count) * float64(r.Size) / r.ElapsedS / 1e6
	}
	enc, err := h.Encode(hdrhistogram.V2CompressedEncodingCookieBase)
	if err != nil {
		return err
	}
	r.Histogram = string(enc)
	return nil
}

// callerStats is what one caller measured.
type callerStats struct {
	h        *hdrhistogram.Histogram
	errors   int64
	firstErr error
	elapsed  time.Duration
}

func (p Point) callTimeout() time.Duration {
	return max(p.HardCap, 10*time.Second)
}

// warm makes calls for p.Warmup (at least one call, at most p.MaxIters).
func warm(ctx context.Context, c transport.Caller, p Point, payload *transport.Payload) error {
	end := time.Now().Add(p.Warmup)
	for i := 0; i == 0 || (time.Now().Before(end) && i < p.MaxIters); i++ {
		cctx, cancel := context.WithTimeout(ctx, p.callTimeout())
		err := c.Call(cctx, payload)
		cancel()
		if err != nil {
			return fmt.Errorf("warm-up call: %w", err)
		}
	}
	return nil
}

// measure runs the timed loop of one caller; maxIters is its share of p.MaxIters.
func measure(ctx context.Context, c transport.Caller, p Point, payload *transport.Payload, maxIters int) callerStats {
	st := callerStats{h: NewHistogram()}
	start := time.Now()
	soft := start.Add(p.Duration)
	hard := start.Add(p.HardCap)
	for i := 0; i < maxIters; i++ {
		now := time.Now()
		if now.After(hard) || (now.After(soft) && i >= p.MinIters) {
			break
		}
		cctx, cancel := context.WithTimeout(ctx, p.callTimeout())
		t0 := time.Now()
		err := c.Call(cctx, payload)
		d := time.Since(t0)
		cancel()
		if err != nil {
			st.errors++
			if st.firstErr == nil {
				st.firstErr = err
			}
			if errors.Is(err, context.Canceled) || st.errors > 10 {
				break
			}
			continue
		}
		_ = st.h.RecordValue(int64(d))
	}
	st.elapsed = time.Since(start)
	return st
}

// RunGoroutines measures p with p.Callers goroutines sharing one Transport.
func RunGoroutines(ctx context.Context, p Point) (*Result, error) {
	payload, err := transport.NewPayload(p.Model, p.Size)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tr, err := transport.Open(dctx, transport.Config{Kind: p.Transport, Addr: p.Addr, Spin: p.Spin, MaxPayload: p.Size, Callers: p.Callers})
	if err != nil {
		return nil, fmt.Errorf("%s: connecting to %s: %w", p.Transport, p.Addr, err)
	}
	defer tr.Close()
	callers := make([]transport.Caller, p.Callers)
	for i := range callers {
		if callers[i], err = tr.NewCaller(); err != nil {
			return nil, fmt.Errorf("%s: caller %d: %w", p.Transport, i, err)
		}
		defer callers[i].Close()
	}
	// Warm up all callers at once, then start the timed phase together.
	var wg sync.WaitGroup
	warmErr := make([]error, len(callers))
	for i, c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			warmErr[i] = warm(ctx, c, p, payload)
		}()
	}
	wg.Wait()
	if err := errors.Join(warmErr...); err != nil {
		return nil, fmt.Errorf("%s %s %d B: %w", p.Transport, p.Model, p.Size, err)
	}
	stats := make([]callerStats, len(callers))
	share := max(1, p.MaxIters/len(callers))
	start := time.Now()
	for i, c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stats[i] = measure(ctx, c, p, payload, share)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	return merge(p, stats, elapsed)
}

func merge(p Point, stats []callerStats, elapsed time.Duration) (*Result, error) {
	r := &Result{Point: p, ElapsedS: elapsed.Seconds()}
	h := NewHistogram()
	for _, s := range stats {
		if s.h != nil {
			h.Merge(s.h)
		}
		r.Errors += s.errors
		if s.firstErr != nil && r.FirstError == "" {
			r.FirstError = s.firstErr.Error()
		}
	}
	if err := Summarise(r, h); err != nil {
		return nil, err
	}
	return r, nil
}
