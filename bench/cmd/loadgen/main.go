// Command loadgen drives tensord and the baseline servers through one interface and
// reports latency percentiles from HDR histograms, plus the floors no transport beats.
//
//	loadgen run --points points.json            # points from run.py, one JSON result per line
//	loadgen run --transport grpc --addr /tmp/g.sock --model identity --sizes 16,4096 --callers 1,8
//	loadgen floors --peer ".venv/bin/python bench/servers/floor_peer.py" --sizes 16,4096
//	loadgen run --transport tensord-copy --addr /tmp/t.sock --model mlp --sizes 64 --callers 8 --mode processes --per-proc 8 --stats /tmp/t.sock
//	loadgen run --transport tensord-copy --addr /tmp/t.sock --model efficientnet --kind image --image tests/data/chelsea.jpg --callers 8
//	loadgen run --transport tensord-copy --addr /tmp/t.sock --model mlp --sizes 64 --flood 64   # one caller beside a flooding session
//	loadgen stats --addr /tmp/t.sock              # every model's scheduling counters, as JSON
//	loadgen sessions --addr /tmp/t.sock --n 50  # hold 50 idle sessions until stdin closes
//	loadgen worker                              # internal: one caller process of --mode processes
//
// bench/run.sh starts the servers and calls these; see bench/README.md.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"

	"github.com/tensord/tensord/bench/internal/floor"
	"github.com/tensord/tensord/bench/internal/harness"
	"github.com/tensord/tensord/bench/internal/transport"
	"github.com/tensord/tensord/go/shmclient"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "run":
		err = cmdRun(ctx, os.Args[2:])
	case "floors":
		err = cmdFloors(ctx, os.Args[2:])
	case "sessions":
		err = cmdSessions(ctx, os.Args[2:])
	case "stats":
		err = cmdStats(ctx, os.Args[2:])
	case "worker":
		err = harness.Worker(ctx, os.Stdin, os.Stdout)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: loadgen run|floors|stats|sessions|worker [flags]  (see bench/README.md)")
	os.Exit(2)
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		mult := 1
		switch {
		case strings.HasSuffix(f, "Ki"):
			mult, f = 1<<10, strings.TrimSuffix(f, "Ki")
		case strings.HasSuffix(f, "Mi"):
			mult, f = 1<<20, strings.TrimSuffix(f, "Mi")
		}
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%q is not a number", f)
		}
		out = append(out, n*mult)
	}
	return out, nil
}

func cmdRun(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	pointsFile := fs.String("points", "", "JSON array of points (- for stdin); overrides the matrix flags")
	tr := fs.String("transport", "", strings.Join(transport.Kinds, ", "))
	addr := fs.String("addr", "", "server socket path or host:port")
	spin := fs.Duration("spin", 0, "shmclient spin budget")
	model := fs.String("model", "identity", "the model's name (identity, mlp, or any a daemon serves)")
	kind := fs.String("kind", "", "payload: identity, mlp (f32 rows of 16) or image (--image as a bytes tensor); default: the model's name")
	image := fs.String("image", "", "kind image: the encoded image file to send")
	perProc := fs.Int("per-proc", 1, "--mode processes: goroutines per process")
	flood := fs.Int("flood", 0, "goroutines of a second session flooding the same model meanwhile")
	priority := fs.Int("priority", 0, "1: tensord requests at high priority")
	stats := fs.String("stats", "", "tensord socket: report the model's stats over each point")
	sizes := fs.String("sizes", "16,4Ki", "payload sizes in bytes (Ki, Mi suffixes)")
	callers := fs.String("callers", "1", "concurrent callers")
	mode := fs.String("mode", harness.Goroutines, "goroutines or processes")
	dur := fs.Duration("duration", time.Second, "measuring time per point")
	warmup := fs.Duration("warmup", 200*time.Millisecond, "warm-up time per point")
	maxIters := fs.Int("max-iters", 20000, "most calls per point")
	cpuProfile := fs.String("cpuprofile", "", "write a Go CPU profile of this process to the file")
	_ = fs.Parse(args)
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	var points []harness.Point
	if *pointsFile != "" {
		var data []byte
		var err error
		if *pointsFile == "-" {
			data, err = readAll(os.Stdin)
		} else {
			data, err = os.ReadFile(*pointsFile)
		}
		if err != nil {
			return err
		}
		if err := json.Unmarshal(data, &points); err != nil {
			return fmt.Errorf("%s: %w", *pointsFile, err)
		}
	} else {
		ss, err := ints(*sizes)
		if err != nil {
			return err
		}
		cs, err := ints(*callers)
		if err != nil {
			return err
		}
		for _, s := range ss {
			for _, c := range cs {
				points = append(points, harness.Point{Transport: *tr, Addr: *addr, Spin: *spin, Model: *model,
					Size: s, Callers: c, Mode: *mode, Warmup: *warmup, Duration: *dur, MinIters: 5,
					MaxIters: *maxIters, HardCap: 10 * *dur, Kind: *kind, Image: *image, PerProc: *perProc,
					Flood: *flood, Priority: *priority, Stats: *stats})
			}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	for _, p := range points {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if p.Label == "" {
			p.Label = p.Transport
		}
		var r *harness.Result
		var err error
		if p.Mode == harness.Processes {
			r, err = harness.RunProcesses(ctx, p)
		} else {
			r, err = harness.RunGoroutines(ctx, p)
		}
		if err != nil {
			// One failed point must not lose the others: report it and go on.
			_ = enc.Encode(map[string]any{"point": p, "error": err.Error()})
			fmt.Fprintf(os.Stderr, "loadgen: %s %s %dB x%d %s: %v\n", p.Label, p.Model, p.Size, p.Callers, p.Mode, err)
			continue
		}
		if err := enc.Encode(r); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "  %-28s %-12s %9d B x%-2d %-10s p50 %9.1f us  p99 %9.1f us  %9.0f req/s  n=%d err=%d",
			p.Label, p.Model, p.Size, p.Callers, p.Mode, r.P50, r.P99, r.ThroughputRPS, r.Count, r.Errors)
		if r.Flood != nil {
			fmt.Fprintf(os.Stderr, "  flood x%d %.0f req/s p99 %.0f us", r.Flood.Callers, r.Flood.ThroughputRPS, r.Flood.P99)
		}
		if m := r.ModelStats; m != nil {
			fmt.Fprintf(os.Stderr, "  batch %.1f queue %.0f us pass %.0f us", m.MeanBatch, m.QueueUS, m.ComputeUS)
		}
		if r.FirstError != "" {
			fmt.Fprintf(os.Stderr, "  first error: %s", r.FirstError)
		}
		fmt.Fprintln(os.Stderr)
	}
	return nil
}

func readAll(f *os.File) ([]byte, error) {
	var b []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := f.Read(buf)
		b = append(b, buf[:n]...)
		if err != nil {
			if err.Error() == "EOF" {
				return b, nil
			}
			return b, err
		}
	}
}

// FloorResult is one floor measurement.
type FloorResult struct {
	Floor string  `json:"floor"` // eventfd, eventfd-idle, spin, memcpy
	Size  int     `json:"size,omitempty"`
	Count int64   `json:"count"`
	P50   float64 `json:"p50_us"`
	P90   float64 `json:"p90_us"`
	P99   float64 `json:"p99_us"`
	P999  float64 `json:"p999_us"`
	Max   float64 `json:"max_us"`
	Mean  float64 `json:"mean_us"`
	// memcpy only: bytes per second at the median copy time, and copies per sample.
	GBps  float64 `json:"gbps,omitempty"`
	Batch int     `json:"batch,omitempty"`
	Hdr   string  `json:"hdr"` // HdrHistogram V2 compressed: ns (memcpy: ps)
}

// floorResult summarises h, whose values are in units of perUS per microsecond.
func floorResult(name string, size int, h *hdrhistogram.Histogram, perUS float64) (FloorResult, error) {
	us := func(v int64) float64 { return float64(v) / perUS }
	r := FloorResult{Floor: name, Size: size, Count: h.TotalCount(),
		P50: us(h.ValueAtQuantile(50)), P90: us(h.ValueAtQuantile(90)), P99: us(h.ValueAtQuantile(99)),
		P999: us(h.ValueAtQuantile(99.9)), Max: us(h.Max()), Mean: h.Mean() / perUS}
	enc, err := h.Encode(hdrhistogram.V2CompressedEncodingCookieBase)
	r.Hdr = string(enc)
	return r, err
}

func cmdFloors(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("floors", flag.ExitOnError)
	peer := fs.String("peer", "", "command line of bench/servers/floor_peer.py (split on spaces)")
	sizes := fs.String("sizes", "16,4Ki,1Mi,64Mi", "memcpy sizes")
	dur := fs.Duration("duration", time.Second, "time per ping-pong floor")
	memDur := fs.Duration("memcpy-duration", 300*time.Millisecond, "memcpy time per size")
	iters := fs.Int("max-iters", 200000, "most round trips per floor")
	which := fs.String("only", "eventfd,eventfd-idle,spin,memcpy", "floors to measure")
	gap := fs.Duration("idle-gap", time.Millisecond, "pause before each eventfd-idle round")
	_ = fs.Parse(args)
	enc := json.NewEncoder(os.Stdout)
	want := map[string]bool{}
	for _, w := range strings.Split(*which, ",") {
		want[w] = true
	}
	peerCmd := strings.Fields(*peer)
	if (want["eventfd"] || want["eventfd-idle"] || want["spin"]) && len(peerCmd) == 0 {
		return fmt.Errorf("floors: --peer is required for eventfd and spin")
	}
	lim := floor.Limits{Warmup: 200, MaxIters: *iters, Duration: *dur}
	if want["eventfd"] {
		h, err := floor.EventfdPingPong(ctx, peerCmd, lim)
		if err != nil {
			return fmt.Errorf("eventfd floor: %w", err)
		}
		r, err := floorResult("eventfd", 0, h, 1e3)
		if err != nil {
			return err
		}
		_ = enc.Encode(r)
		fmt.Fprintf(os.Stderr, "  floor eventfd      p50 %7.2f us  p99 %7.2f us  n=%d\n", r.P50, r.P99, r.Count)
	}
	if want["eventfd-idle"] {
		lim := lim
		lim.Gap = *gap
		lim.Warmup = 20
		h, err := floor.EventfdPingPong(ctx, peerCmd, lim)
		if err != nil {
			return fmt.Errorf("eventfd floor (idle): %w", err)
		}
		r, err := floorResult("eventfd-idle", 0, h, 1e3)
		if err != nil {
			return err
		}
		_ = enc.Encode(r)
		fmt.Fprintf(os.Stderr, "  floor eventfd-idle p50 %7.2f us  p99 %7.2f us  n=%d (after %v idle)\n", r.P50, r.P99, r.Count, *gap)
	}
	if want["spin"] {
		lim := lim
		lim.Warmup = 2000
		h, err := floor.SpinPingPong(ctx, peerCmd, lim)
		if err != nil {
			return fmt.Errorf("spin floor: %w", err)
		}
		r, err := floorResult("spin", 0, h, 1e3)
		if err != nil {
			return err
		}
		_ = enc.Encode(r)
		fmt.Fprintf(os.Stderr, "  floor spin  p50 %7.2f us  p99 %7.2f us  n=%d\n", r.P50, r.P99, r.Count)
	}
	if want["memcpy"] {
		ss, err := ints(*sizes)
		if err != nil {
			return err
		}
		for _, s := range ss {
			l := floor.Limits{Warmup: 3, MaxIters: *iters, Duration: *memDur}
			h, batch := floor.Memcpy(s, l)
			r, err := floorResult("memcpy", s, h, 1e6)
			if err != nil {
				return err
			}
			r.Batch = batch
			if r.P50 > 0 {
				r.GBps = float64(s) / (r.P50 * 1e3) // bytes per ns = GB/s
			}
			_ = enc.Encode(r)
			fmt.Fprintf(os.Stderr, "  floor memcpy %9d B  p50 %10.3f us  %6.2f GB/s\n", s, r.P50, r.GBps)
		}
	}
	return nil
}

// cmdStats prints every model's scheduling counters (shmclient.Stats) as one JSON line.
func cmdStats(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("stats", flag.ExitOnError)
	addr := fs.String("addr", "", "tensord socket (default: $TENSORD_SOCKET, ...)")
	_ = fs.Parse(args)
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := shmclient.Dial(dctx, *addr, shmclient.WithRingSize(1<<16, 1<<16), shmclient.WithName("tensord-bench-stats"))
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := c.Stats(dctx)
	if err != nil {
		return err
	}
	type row struct {
		shmclient.ModelStats
		MeanBatch float64 `json:"mean_batch"`
	}
	out := make([]row, len(st))
	for i, m := range st {
		out[i] = row{m, m.MeanBatchSize()}
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}
