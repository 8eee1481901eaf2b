// Package harness runs one benchmark point (transport, model, payload size, callers) in
// goroutines or in separate processes and summarises the latencies from HDR histograms.
package harness

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
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
	// Phase and Round tag points of the interleaved phases (run.py); Variant names a
	// server configuration within a phase (e.g. batched, unbatched).
	Phase   string `json:"phase,omitempty"`
	Round   int    `json:"round,omitempty"`
	Variant string `json:"variant,omitempty"`
	// Kind is the payload (identity, mlp, image; default Model), Image the encoded image
	// file of kind image.
	Kind  string `json:"kind,omitempty"`
	Image string `json:"image,omitempty"`
	// PerProc is the number of goroutines (sharing one connection) in each process of
	// Mode processes; default 1.
	PerProc int `json:"per_proc,omitempty"`
	// Priority 1 sends tensord requests at high priority.
	Priority int `json:"priority,omitempty"`
	// Flood > 0 runs that many goroutines on a second connection (session) calling the same
	// model with the same payload during the point: the measured callers are the light
	// client beside a flooding one (Mode goroutines only).
	Flood int `json:"flood,omitempty"`
	// Stats is a tensord socket: its model stats for Model are sampled just before and
	// after the timed phase and the difference is reported.
	Stats string `json:"stats,omitempty"`
}

func (p Point) payload() (*transport.Payload, error) {
	return transport.NewPayloadKind(p.Kind, p.Model, p.Size, p.Image)
}

func (p Point) config(callers int, payload *transport.Payload) transport.Config {
	return transport.Config{Kind: p.Transport, Addr: p.Addr, Spin: p.Spin,
		MaxPayload: max(p.Size, len(payload.Data)), Callers: callers, Priority: p.Priority}
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
	// Flood is the flooding client's share of a Point with Flood > 0.
	Flood *FloodResult `json:"flood_result,omitempty"`
	// ModelStats is the daemon's counters for the model over the timed phase (Point.Stats).
	ModelStats *StatsDelta `json:"model_stats,omitempty"`
	// WarmCalls is the number of warm-up calls before the timed phase (goroutines mode),
	// ClientCPUUS the load generator's CPU (user + system, all threads) per call in the timed
	// phase (goroutines mode, without a flood): the Go client's cost per call.
	WarmCalls   int64   `json:"warm_calls,omitempty"`
	ClientCPUUS float64 `json:"client_cpu_us,omitempty"`
}

// processCPU is this process's user + system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// FloodResult is what the flooding client of a Point with Flood > 0 did during the timed
// phase.
type FloodResult struct {
	Callers       int     `json:"callers"`
	Count         int64   `json:"count"`
	Errors        int64   `json:"errors"`
	ThroughputRPS float64 `json:"throughput_rps"`
	P50           float64 `json:"p50_us"`
	P99           float64 `json:"p99_us"`
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

// warm makes calls for p.Warmup (at least one call, at most p.MaxIters); it returns how
// many it made.
func warm(ctx context.Context, c transport.Caller, p Point, payload *transport.Payload) (int64, error) {
	end := time.Now().Add(p.Warmup)
	var i int64
	for ; i == 0 || (time.Now().Before(end) && i < int64(p.MaxIters)); i++ {
		cctx, cancel := context.WithTimeout(ctx, p.callTimeout())
		err := c.Call(cctx, payload)
		cancel()
		if err != nil {
			return i, fmt.Errorf("warm-up call: %w", err)
		}
	}
	return i, nil
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

// group is one Transport and its callers (goroutines), with the payload they send.
type group struct {
	tr      transport.Transport
	callers []transport.Caller
	payload *transport.Payload
}

// openGroup connects n callers of p on one Transport.
func openGroup(ctx context.Context, p Point, n int) (*group, error) {
	payload, err := p.payload()
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	g := &group{payload: payload}
	if g.tr, err = transport.Open(dctx, p.config(n, payload)); err != nil {
		return nil, fmt.Errorf("%s: connecting to %s: %w", p.Transport, p.Addr, err)
	}
	g.callers = make([]transport.Caller, n)
	for i := range g.callers {
		if g.callers[i], err = g.tr.NewCaller(); err != nil {
			g.close()
			return nil, fmt.Errorf("%s: caller %d: %w", p.Transport, i, err)
		}
	}
	return g, nil
}

func (g *group) close() {
	for _, c := range g.callers {
		if c != nil {
			_ = c.Close()
		}
	}
	_ = g.tr.Close()
}

// warm warms every caller up at once; it returns how many calls they made.
func (g *group) warm(ctx context.Context, p Point) (int64, error) {
	var wg sync.WaitGroup
	var calls atomic.Int64
	errs := make([]error, len(g.callers))
	for i, c := range g.callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := warm(ctx, c, p, g.payload)
			calls.Add(n)
			errs[i] = err
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return calls.Load(), fmt.Errorf("%s %s %d B: %w", p.Transport, p.Model, p.Size, err)
	}
	return calls.Load(), nil
}

// measure runs the timed phase of every caller together; p.MaxIters is shared out.
func (g *group) measure(ctx context.Context, p Point) ([]callerStats, time.Duration) {
	var wg sync.WaitGroup
	stats := make([]callerStats, len(g.callers))
	share := max(1, p.MaxIters/len(g.callers))
	start := time.Now()
	for i, c := range g.callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stats[i] = measure(ctx, c, p, g.payload, share)
		}()
	}
	wg.Wait()
	return stats, time.Since(start)
}

// RunGoroutines measures p with p.Callers goroutines sharing one Transport (and, with
// p.Flood, a flooding client on a second one).
func RunGoroutines(ctx context.Context, p Point) (*Result, error) {
	g, err := openGroup(ctx, p, p.Callers)
	if err != nil {
		return nil, err
	}
	defer g.close()
	var fl *flooder
	if p.Flood > 0 {
		if fl, err = startFlood(ctx, p); err != nil {
			return nil, err
		}
		defer fl.stop()
	}
	warmCalls, err := g.warm(ctx, p)
	if err != nil {
		return nil, err
	}
	probe := openProbe(ctx, p)
	defer probe.close()
	probe.before(ctx)
	if fl != nil {
		fl.mark()
	}
	cpu0 := processCPU()
	stats, elapsed := g.measure(ctx, p)
	cpu := processCPU() - cpu0
	var flood *FloodResult
	if fl != nil {
		flood = fl.result(elapsed)
	}
	ms := probe.after(ctx)
	r, err := merge(p, stats, elapsed)
	if err != nil {
		return nil, err
	}
	r.Flood, r.ModelStats, r.WarmCalls = flood, ms, warmCalls
	if r.Count > 0 && fl == nil {
		r.ClientCPUUS = float64(cpu) / 1e3 / float64(r.Count)
	}
	return r, nil
}

// flooder is the flooding client of a Point with Flood > 0: p.Flood goroutines on their
// own connection, calling back to back until stopped. Calls completed between mark and
// result are counted and their latencies recorded.
type flooder struct {
	g         *group
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	measuring atomic.Bool
	count     atomic.Int64
	errs      atomic.Int64
	hists     []*hdrhistogram.Histogram
	done      bool
}

func startFlood(ctx context.Context, p Point) (*flooder, error) {
	fp := p
	fp.Priority = 0 // the flood is normal traffic; p.Priority is the light client's
	g, err := openGroup(ctx, fp, p.Flood)
	if err != nil {
		return nil, fmt.Errorf("flood: %w", err)
	}
	if _, err := g.warm(ctx, fp); err != nil {
		g.close()
		return nil, fmt.Errorf("flood: %w", err)
	}
	fctx, cancel := context.WithCancel(ctx)
	f := &flooder{g: g, cancel: cancel, hists: make([]*hdrhistogram.Histogram, len(g.callers))}
	for i, c := range g.callers {
		f.hists[i] = NewHistogram()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			for fctx.Err() == nil {
				cctx, ccancel := context.WithTimeout(fctx, p.callTimeout())
				t0 := time.Now()
				err := c.Call(cctx, g.payload)
				d := time.Since(t0)
				ccancel()
				if !f.measuring.Load() {
					continue
				}
				if err != nil {
					if fctx.Err() == nil {
						f.errs.Add(1)
					}
					continue
				}
				f.count.Add(1)
				_ = f.hists[i].RecordValue(int64(d))
			}
		}()
	}
	return f, nil
}

func (f *flooder) mark() { f.measuring.Store(true) }

// result stops the flood's counting and summarises it over elapsed.
func (f *flooder) result(elapsed time.Duration) *FloodResult {
	f.measuring.Store(false)
	n := f.count.Load()
	f.stop()
	h := NewHistogram()
	for _, x := range f.hists {
		h.Merge(x)
	}
	return &FloodResult{Callers: len(f.g.callers), Count: n, Errors: f.errs.Load(),
		ThroughputRPS: float64(n) / elapsed.Seconds(),
		P50:           float64(h.ValueAtQuantile(50)) / 1e3, P99: float64(h.ValueAtQuantile(99)) / 1e3}
}

func (f *flooder) stop() {
	if f.done {
		return
	}
	f.done = true
	f.cancel()
	f.wg.Wait()
	f.g.close()
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
