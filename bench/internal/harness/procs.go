package harness

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// workerReport is what a worker process prints when it is done.
type workerReport struct {
	Histogram  string `json:"hdr"`
	Errors     int64  `json:"errors"`
	FirstError string `json:"first_error,omitempty"`
	ElapsedNS  int64  `json:"elapsed_ns"`
}

type worker struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  *bufio.Scanner
	stderr strings.Builder
}

// RunProcesses measures p with p.Callers worker processes (this executable, run with
// `worker` as its first argument), each with its own connection and one caller. They
// warm up, report READY, start together on GO and report their histograms.
func RunProcesses(ctx context.Context, p Point) (*Result, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.Warmup+p.HardCap+90*time.Second)
	defer cancel() // kills every worker still running (exec.CommandContext)
	one := p
	one.Callers = max(1, p.PerProc)
	one.MaxIters = max(1, p.MaxIters/p.Callers)
	one.Stats = "" // sampled here, around every worker's timed phase
	spec, err := json.Marshal(one)
	if err != nil {
		return nil, err
	}
	workers := make([]*worker, p.Callers)
	defer func() {
		// Let workers finish (close their sessions cleanly), then kill any left.
		_ = each(workers, func(_ int, w *worker) error {
			if w == nil || w.cmd.Process == nil {
				return nil
			}
			_ = w.stdin.Close()
			done := make(chan struct{})
			go func() { _ = w.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				_ = w.cmd.Process.Kill()
				<-done
			}
			return nil
		})
	}()
	for i := range workers {
		w := &worker{cmd: exec.CommandContext(ctx, exe, "worker")}
		w.cmd.Stderr = &w.stderr
		if w.stdin, err = w.cmd.StdinPipe(); err != nil {
			return nil, err
		}
		out, err := w.cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		w.lines = bufio.NewScanner(out)
		w.lines.Buffer(make([]byte, 1<<20), 16<<20)
		if err := w.cmd.Start(); err != nil {
			return nil, err
		}
		workers[i] = w
		if _, err := fmt.Fprintf(w.stdin, "%s\n", spec); err != nil {
			return nil, err
		}
	}
	readLine := func(w *worker, i int) (string, error) {
		if !w.lines.Scan() {
			return "", fmt.Errorf("worker %d ended early: %v %s", i, w.lines.Err(), strings.TrimSpace(w.stderr.String()))
		}
		return w.lines.Text(), nil
	}
	// All READY, read concurrently so a slow worker does not serialise the others.
	if err := each(workers, func(i int, w *worker) error {
		line, err := readLine(w, i)
		if err != nil {
			return err
		}
		if line != "READY" {
			return fmt.Errorf("worker %d: %s", i, line)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("%s %s %d B x%d processes: %w", p.Transport, p.Model, p.Size, p.Callers, err)
	}
	probe := openProbe(ctx, p)
	defer probe.close()
	probe.before(ctx)
	for _, w := range workers {
		if _, err := io.WriteString(w.stdin, "GO\n"); err != nil {
			return nil, err
		}
	}
	reports := make([]workerReport, len(workers))
	if err := each(workers, func(i int, w *worker) error {
		line, err := readLine(w, i)
		if err != nil {
			return err
		}
		return json.Unmarshal([]byte(line), &reports[i])
	}); err != nil {
		return nil, err
	}
	stats := make([]callerStats, len(reports))
	var elapsed time.Duration
	for i, rep := range reports {
		h, err := hdrhistogram.Decode([]byte(rep.Histogram))
		if err != nil {
			return nil, fmt.Errorf("worker %d histogram: %w", i, err)
		}
		stats[i] = callerStats{h: h, errors: rep.Errors}
		if rep.FirstError != "" {
			stats[i].firstErr = errors.New(rep.FirstError)
		}
		elapsed = max(elapsed, time.Duration(rep.ElapsedNS))
	}
	ms := probe.after(ctx)
	r, err := merge(p, stats, elapsed)
	if err != nil {
		return nil, err
	}
	r.ModelStats = ms
	return r, nil
}

func each(ws []*worker, f func(int, *worker) error) error {
	errs := make([]error, len(ws))
	var wg sync.WaitGroup
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i, w)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Worker is the body of a worker process: it reads its Point from stdin (Callers is the
// goroutines it runs on one connection), connects, warms up, prints READY, waits for GO,
// measures and prints its report.
func Worker(ctx context.Context, in io.Reader, out io.Writer) error {
	lines := bufio.NewScanner(in)
	lines.Buffer(make([]byte, 1<<20), 1<<20)
	if !lines.Scan() {
		return fmt.Errorf("worker: no point on stdin")
	}
	var p Point
	if err := json.Unmarshal(lines.Bytes(), &p); err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	g, err := openGroup(ctx, p, max(1, p.Callers))
	if err != nil {
		fmt.Fprintf(out, "connect: %v\n", err)
		return err
	}
	defer g.close()
	if _, err := g.warm(ctx, p); err != nil {
		fmt.Fprintf(out, "%v\n", err)
		return err
	}
	fmt.Fprintln(out, "READY")
	if !lines.Scan() || lines.Text() != "GO" {
		return fmt.Errorf("worker: no GO")
	}
	stats, _ := g.measure(ctx, p)
	var elapsed time.Duration
	for _, st := range stats {
		elapsed = max(elapsed, st.elapsed)
	}
	r, err := merge(p, stats, elapsed)
	if err != nil {
		return err
	}
	rep := workerReport{Histogram: r.Histogram, Errors: r.Errors, FirstError: r.FirstError, ElapsedNS: int64(elapsed)}
	b, err := json.Marshal(rep)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(out, "%s\n", b)
	return err
}
