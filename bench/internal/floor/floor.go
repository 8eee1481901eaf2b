// Package floor measures what no transport between a Go and a Python process can beat:
// an eventfd ping-pong (the blocking floor: the wake-up tensord's protocol 3 uses), a
// busy-poll ping-pong on shared memory (the spinning floor), and memcpy bandwidth.
//
// Pure Go, no cgo: eventfds and memfds are plain system calls. The Python side is
// bench/servers/floor_peer.py, which receives its descriptors as fds 3 and 4 (exec's
// ExtraFiles), so nothing of a floor has a name in /dev/shm.
package floor

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Limits bounds a floor measurement by count and time.
type Limits struct {
	Warmup   int
	MaxIters int
	Duration time.Duration
	// Gap is an idle pause (time.Sleep) before each blocking round, so both processes have
	// gone to sleep and their CPUs idle when the round starts, as between real requests.
	Gap time.Duration
}

// peer is the Python side (bench/servers/floor_peer.py), started by the caller's command.
type peer struct {
	cmd    *exec.Cmd
	stderr strings.Builder
}

// startPeer starts argv with files as its descriptors 3, 4, ... and waits for READY.
func startPeer(ctx context.Context, argv []string, files []*os.File) (*peer, error) {
	p := &peer{cmd: exec.CommandContext(ctx, argv[0], argv[1:]...)}
	p.cmd.Stderr = &p.stderr
	p.cmd.ExtraFiles = files
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	ready := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() && sc.Text() == "READY" {
			ready <- nil
			return
		}
		ready <- fmt.Errorf("floor peer did not start: %s", strings.TrimSpace(p.stderr.String()))
	}()
	select {
	case err := <-ready:
		if err != nil {
			p.stop()
			return nil, err
		}
		return p, nil
	case <-time.After(30 * time.Second):
		p.stop()
		return nil, fmt.Errorf("floor peer did not report READY in 30 s")
	}
}

// stop ends the peer (it would also exit by itself once idle).
func (p *peer) stop() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = p.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			_ = p.cmd.Process.Kill()
			<-done
		}
	}
}

func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(1, int64(10*time.Minute), 3) }

// pingPong warms up (lim.Warmup rounds, at most 5 s), then records rounds until
// lim.MaxIters or lim.Duration.
func pingPong(lim Limits, round func() (time.Duration, error)) (*hdrhistogram.Histogram, error) {
	start := time.Now()
	for i := 0; i < lim.Warmup && time.Since(start) < 5*time.Second; i++ {
		if _, err := round(); err != nil {
			return nil, err
		}
	}
	h := newHist()
	start = time.Now()
	for i := 0; i < lim.MaxIters && time.Since(start) < lim.Duration; i++ {
		d, err := round()
		if err != nil {
			return nil, err
		}
		_ = h.RecordValue(int64(d))
	}
	return h, nil
}
