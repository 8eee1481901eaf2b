package shmclient

import (
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Option configures Dial.
type Option func(*options) error

type options struct {
	name         string
	requestRing  uint64
	responseRing uint64
	spin         time.Duration
}

func defaultOptions() options {
	name := "shmclient"
	if len(os.Args) > 0 {
		name = filepath.Base(os.Args[0]) + " (go shmclient)"
	}
	if len(name) > 128 {
		name = name[:128]
	}
	return options{name: name}
}

// WithRingSize asks for request and response ring capacities in bytes; 0 keeps the
// daemon's default (16 MiB). The daemon rounds up to a power of two of at least 64 KiB
// and refuses sizes above its max_ring (TOO_LARGE at Dial). A record (descriptor plus
// tensor bytes, 64-byte aligned) must fit in its ring, so size the request ring for the
// largest request and the response ring for the largest response plus any responses
// held unreleased at the same time.
func WithRingSize(request, response int) Option {
	return func(o *options) error {
		if request < 0 || response < 0 {
			return fmt.Errorf("shmclient: WithRingSize(%d, %d): sizes must not be negative", request, response)
		}
		o.requestRing, o.responseRing = uint64(request), uint64(response)
		return nil
	}
}

// WithSpin sets the spin budget of the wait protocol (SPEC §4.5): how long a waiter
// polls the ring before sleeping on a semaphore. Spinning trades a CPU core for lower
// latency; the default 0 always blocks, which is right unless cores are to spare.
func WithSpin(d time.Duration) Option {
	return func(o *options) error {
		if d < 0 {
			return fmt.Errorf("shmclient: WithSpin(%v): must not be negative", d)
		}
		o.spin = d
		return nil
	}
}

// WithName sets the client name the daemon logs (at most 128 bytes). The default is
// the program name.
func WithName(name string) Option {
	return func(o *options) error {
		if len(name) > 128 {
			return fmt.Errorf("shmclient: WithName: name of %d bytes exceeds 128", len(name))
		}
		o.name = name
		return nil
	}
}
