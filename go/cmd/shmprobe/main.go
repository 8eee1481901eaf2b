// Command shmprobe drives a tensord daemon from Go for the Python end-to-end tests.
//
//	shmprobe -mode roundtrip -n 100 -bytes 65536   # N identity requests, verified; prints "ok N"
//	shmprobe -mode hang -model mlp                 # publish one request, print "sent", sleep forever
//	shmprobe -mode loop -model mlp -n 100000       # N requests built from the model's metadata
//	                                               # (as hang); prints "ok N", or the first error
//	shmprobe -mode latency -n 2000                 # 4 KiB identity round trips; prints p50/p99 µs as JSON
//	shmprobe -mode latency -model efficientnet -input image -file cat.jpg -n 50
//	                                               # the file as a 1-element bytes tensor instead
//	shmprobe -mode echo -model echo -goroutines 8 -n 500 -id 3 [-own-sessions] [-scale 2 -offset 1]
//	                                               # i64 [1,2] rows of unique ids through a model
//	                                               # that echoes them; prints "ok N"
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

func main() {
	socket := flag.String("socket", "", "daemon socket (default: $TENSORD_SOCKET or the SPEC default)")
	model := flag.String("model", "identity", "model to call")
	mode := flag.String("mode", "roundtrip", "roundtrip | hang | loop | latency | echo")
	goroutines := flag.Int("goroutines", 8, "echo: concurrent callers on the one client")
	procID := flag.Int64("id", 0, "echo: this process's number, part of every id it sends")
	n := flag.Int("n", 100, "number of requests (roundtrip, latency)")
	size := flag.Int("bytes", 4096, "payload bytes per request (roundtrip; latency uses 4096)")
	timeout := flag.Duration("timeout", 60*time.Second, "overall time limit (not for hang)")
	file := flag.String("file", "", "latency: send this file's bytes as a bytes tensor to -model")
	input := flag.String("input", "image", "latency: input name for -file")
	spin := flag.Duration("spin", 0, "spin budget of the wait protocol (0: always block)")
	ownSessions := flag.Bool("own-sessions", false, "echo: each goroutine dials a session of its own")
	scale := flag.Int64("scale", 1, "echo: the model answers scale*x + offset")
	offset := flag.Int64("offset", 0, "echo: the model answers scale*x + offset")
	flag.Parse()

	ctx := context.Background()
	if *mode != "hang" {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	c, err := shmclient.Dial(ctx, *socket, shmclient.WithName("shmprobe "+*mode), shmclient.WithSpin(*spin))
	if err != nil {
		fail(err)
	}
	defer c.Close()

	switch *mode {
	case "roundtrip":
		roundtrip(ctx, c, *model, *n, *size)
	case "hang":
		hang(ctx, c, *model, *size)
	case "loop":
		loop(ctx, c, *model, *n, *size)
	case "latency":
		x := shmclient.FromUint8("x", []int64{4096}, make([]byte, 4096))
		m := "identity"
		if *file != "" {
			data, err := os.ReadFile(*file)
			if err != nil {
				fail(err)
			}
			x, m = shmclient.FromBytes(*input, []int64{1}, [][]byte{data}), *model
		}
		latency(ctx, c, m, x, *n)
	case "echo":
		dial := func() (*shmclient.Client, error) { return c, nil }
		if *ownSessions {
			dial = func() (*shmclient.Client, error) {
				return shmclient.Dial(ctx, *socket, shmclient.WithName("shmprobe echo"), shmclient.WithSpin(*spin))
			}
		}
		echo(ctx, dial, *model, *procID, *goroutines, *n, *scale, *offset)
	default:
		fail(fmt.Errorf("unknown -mode %q (want roundtrip, hang, loop, latency or echo)", *mode))
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "shmprobe:", err)
	os.Exit(1)
}

func roundtrip(ctx context.Context, c *shmclient.Client, model string, n, size int) {
	for i := 0; i < n; i++ {
		data := make([]byte, size)
		for j := range data {
			data[j] = byte(i*31 + j)
		}
		out, err := c.Infer(ctx, model, shmclient.FromUint8("x", []int64{int64(size)}, data))
		if err != nil {
			fail(fmt.Errorf("request %d: %w", i, err))
		}
		if len(out) != 1 || out[0].DType != shmclient.U8 || !bytes.Equal(out[0].Data, data) {
			fail(fmt.Errorf("request %d: response does not match the request", i))
		}
	}
	fmt.Printf("ok %d\n", n)
}

// echo sends n requests from each of g goroutines, each an i64 [1,2] row (process id,
// goroutine<<32 | request) that the model must return unchanged: with batching, a reply
// that carried another request's rows would show.
func echo(ctx context.Context, dial func() (*shmclient.Client, error), model string, proc int64, g, n int, scale, offset int64) {
	var wg sync.WaitGroup
	errs := make(chan error, g)
	for w := 0; w < g; w++ {
		wg.Add(1)
		go func(w int64) {
			defer wg.Done()
			c, err := dial()
			if err != nil {
				errs <- fmt.Errorf("goroutine %d: %w", w, err)
				return
			}
			for i := int64(0); i < int64(n); i++ {
				in := []int64{proc, w<<32 | i}
				out, err := c.Infer(ctx, model, shmclient.FromInt64("x", []int64{1, 2}, in))
				if err != nil {
					errs <- fmt.Errorf("goroutine %d request %d: %w", w, i, err)
					return
				}
				got := out[0].Int64s()
				if len(got) != 2 || got[0] != scale*in[0]+offset || got[1] != scale*in[1]+offset {
					errs <- fmt.Errorf("goroutine %d request %d: sent %v, got %v (want %d*x+%d)", w, i, in, got, scale, offset)
					return
				}
			}
		}(int64(w))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail(err)
	}
	fmt.Printf("ok %d\n", g*n)
}

// hang publishes one request and then never reads its response, so a test can kill this
// process while the daemon holds the request.
func hang(ctx context.Context, c *shmclient.Client, model string, size int) {
	specs, err := inputSpecs(ctx, c, model, size)
	if err != nil {
		fail(err)
	}
	req, err := c.NewRequest(ctx, model, specs...)
	if err != nil {
		fail(err)
	}
	// A reservation holds whatever the ring held before: give every input ones (empty
	// strings for bytes) so the model runs instead of failing on garbage.
	for i := 0; i < req.NumInputs(); i++ {
		fillOnes(req.Input(i))
	}
	if err := req.Send(ctx); err != nil {
		fail(err)
	}
	fmt.Println("sent")
	select {}
}

// loop sends n requests to model with inputs of ones shaped from its metadata (as hang) and
// stops at the first error, so a test can keep a model busy from Go.
func loop(ctx context.Context, c *shmclient.Client, model string, n, size int) {
	specs, err := inputSpecs(ctx, c, model, size)
	if err != nil {
		fail(err)
	}
	for i := 0; i < n; i++ {
		req, err := c.NewRequest(ctx, model, specs...)
		if err != nil {
			fail(fmt.Errorf("request %d: %w", i, err))
		}
		for j := 0; j < req.NumInputs(); j++ {
			fillOnes(req.Input(j))
		}
		if err := req.Send(ctx); err != nil {
			fail(fmt.Errorf("request %d: %w", i, err))
		}
		resp, err := req.Wait(ctx)
		if err != nil {
			fail(fmt.Errorf("request %d: %w", i, err))
		}
		resp.Release()
	}
	fmt.Printf("ok %d\n", n)
}

// inputSpecs builds inputs for model from its metadata: "any" dtypes become f32 of
// size/4 elements, any-rank shapes of a concrete dtype become scalars, and -1 dimensions
// become 1.
func inputSpecs(ctx context.Context, c *shmclient.Client, model string, size int) ([]shmclient.TensorSpec, error) {
	models, err := c.Models(ctx)
	if err != nil {
		return nil, err
	}
	for _, m := range models {
		if m.Name != model {
			continue
		}
		specs := make([]shmclient.TensorSpec, len(m.Inputs))
		for i, in := range m.Inputs {
			s := shmclient.TensorSpec{Name: in.Name, DType: in.DType, Shape: []int64{}}
			switch {
			case in.DType == shmclient.AnyDType || in.DType == shmclient.InvalidDType:
				s.DType = shmclient.F32
				s.Shape = []int64{int64(max(size/4, 1))}
			case in.Shape != nil:
				for _, d := range in.Shape {
					s.Shape = append(s.Shape, max(d, 1))
				}
			}
			if s.DType == shmclient.Bytes {
				n := int64(1)
				for _, d := range s.Shape {
					n *= d
				}
				s.NBytes = 4 * n // empty strings: just their lengths
			}
			specs[i] = s
		}
		return specs, nil
	}
	// Unknown to the daemon: send something anyway, the daemon answers UNKNOWN_MODEL.
	return []shmclient.TensorSpec{{Name: "x", DType: shmclient.F32, Shape: []int64{int64(max(size/4, 1))}}}, nil
}

func fillOnes(t shmclient.Tensor) {
	switch t.DType {
	case shmclient.F32:
		fill(t.Float32s(), 1)
	case shmclient.F64:
		fill(t.Float64s(), 1)
	case shmclient.F16:
		fill(t.Uint16s(), shmclient.Float32ToFloat16(1))
	case shmclient.BF16:
		fill(t.Uint16s(), shmclient.Float32ToBFloat16(1))
	case shmclient.I64:
		fill(t.Int64s(), 1)
	case shmclient.I32:
		fill(t.Int32s(), 1)
	case shmclient.I16:
		fill(t.Int16s(), 1)
	case shmclient.I8:
		fill(t.Int8s(), 1)
	case shmclient.U8, shmclient.Bool:
		fill(t.Data, 1)
	case shmclient.Bytes:
		fill(t.Data, 0)
	}
}

func fill[E any](s []E, v E) {
	for i := range s {
		s[i] = v
	}
}

func latency(ctx context.Context, c *shmclient.Client, model string, x shmclient.Tensor, n int) {
	for i := 0; i < min(n/10+10, 200); i++ { // warm up both processes
		if _, err := c.Infer(ctx, model, x); err != nil {
			fail(err)
		}
	}
	samples := make([]time.Duration, n)
	start := time.Now()
	for i := range samples {
		t0 := time.Now()
		if _, err := c.Infer(ctx, model, x); err != nil {
			fail(err)
		}
		samples[i] = time.Since(t0)
	}
	total := time.Since(start)
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	pct := func(p float64) float64 {
		return float64(samples[min(int(p*float64(n)), n-1)].Nanoseconds()) / 1e3
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"n":       n,
		"model":   model,
		"bytes":   len(x.Data),
		"p50_us":  pct(0.50),
		"p99_us":  pct(0.99),
		"min_us":  float64(samples[0].Nanoseconds()) / 1e3,
		"max_us":  float64(samples[n-1].Nanoseconds()) / 1e3,
		"mean_us": float64(total.Nanoseconds()) / 1e3 / float64(n),
	})
}
