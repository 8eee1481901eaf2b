// Command restartgap measures what Go callers see while the daemon is restarted: workers
// call a model through one shmclient.Client, each call with its own deadline, until stdin
// closes; then it prints, as one JSON object, every worker's answer times and every error.
// bench/restart_gap.py restarts the daemon meanwhile (`tensord upgrade`, or SIGTERM and a
// fresh start) and computes each caller's gap around each restart.
//
//	restartgap -socket /tmp/t.sock -workers 8 -deadline 1s -model mlp < control-pipe
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

type report struct {
	StartUnixNS int64     `json:"start_unix_ns"`
	Answers     [][]int64 `json:"answers"` // per worker: ns since start of each answer
	Errors      []string  `json:"errors"`
	Calls       int64     `json:"calls"`
}

func main() {
	socket := flag.String("socket", "", "tensord socket")
	workers := flag.Int("workers", 8, "goroutines calling")
	deadline := flag.Duration("deadline", time.Second, "each call's deadline")
	model := flag.String("model", "mlp", "model to call (f32 [1,16] input)")
	flag.Parse()
	ctx := context.Background()
	c, err := shmclient.Dial(ctx, *socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "restartgap:", err)
		os.Exit(1)
	}
	defer c.Close()
	start := time.Now()
	rep := report{StartUnixNS: start.UnixNano(), Answers: make([][]int64, *workers)}
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := shmclient.FromFloat32("x", []int64{1, 16}, make([]float32, 16))
			for {
				select {
				case <-stop:
					return
				default:
				}
				cctx, cancel := context.WithTimeout(ctx, *deadline)
				_, err := c.Infer(cctx, *model, x)
				cancel()
				now := time.Since(start).Nanoseconds()
				mu.Lock()
				rep.Calls++
				if err != nil {
					rep.Errors = append(rep.Errors, fmt.Sprintf("%d %v", now, err))
				} else {
					rep.Answers[w] = append(rep.Answers[w], now)
				}
				mu.Unlock()
			}
		}()
	}
	fmt.Println("READY")
	io.Copy(io.Discard, os.Stdin) // the driver closes stdin to stop
	close(stop)
	wg.Wait()
	json.NewEncoder(os.Stdout).Encode(rep)
}
