package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

// cmdSessions opens n tensord sessions (small rings) and holds them open, idle, until
// its stdin closes or it is signalled: the idle-daemon measurement's clients. It prints
// "connected N" once every session is up.
func cmdSessions(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sessions", flag.ExitOnError)
	addr := fs.String("addr", "", "tensord socket path")
	n := fs.Int("n", 50, "sessions to open")
	ring := fs.Int("ring", 64<<10, "request and response ring size of each session")
	hold := fs.Duration("hold", 2*time.Minute, "longest time to hold them")
	_ = fs.Parse(args)
	var clients []*shmclient.Client
	defer func() {
		for _, c := range clients {
			_ = c.Close()
		}
	}()
	for i := 0; i < *n; i++ {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		c, err := shmclient.Dial(dctx, *addr, shmclient.WithRingSize(*ring, *ring),
			shmclient.WithName(fmt.Sprintf("tensord-bench-idle-%d", i)))
		cancel()
		if err != nil {
			return fmt.Errorf("session %d of %d: %w", i+1, *n, err)
		}
		clients = append(clients, c)
	}
	// One call each, so every session has been through the data path once.
	x := shmclient.FromFloat32("x", []int64{16}, make([]float32, 16))
	for i, c := range clients {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := c.Infer(cctx, "identity", x)
		cancel()
		if err != nil {
			return fmt.Errorf("session %d: first call: %w", i+1, err)
		}
	}
	fmt.Printf("connected %d\n", len(clients))
	done := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
		}
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
	case <-time.After(*hold):
	}
	return nil
}
