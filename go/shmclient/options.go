package shmclient

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"
)

// Option configures Dial.
type Option func(*options) error

type options struct {
	name         string
	requestRing  uint64
	responseRing uint64
	spin         time.Duration
}

// maxClientName is hello's limit on the client name (SPEC §2.4), in bytes.
const maxClientName = 128

func defaultOptions() options {
	return options{name: defaultName(os.Args)}
}

// defaultName names the client after its program. The daemon decodes the name as
// UTF-8 and refuses the handshake (BAD_FRAME) when it is not, so bytes that are not
// UTF-8 (program names are bytes on Linux) are replaced and the name is cut at a rune
// boundary, never inside a character.
func defaultName(args []string) string {
	if len(args) == 0 || args[0] == "" {
		return "shmclient"
	}
	name := strings.ToValidUTF8(filepath.Base(args[0]), "\uFFFD") + " (go shmclient)"
	return truncateUTF8(name, maxClientName)
}

// truncateUTF8 returns the longest prefix of s of at most n bytes that does not end
// inside a character (s is valid UTF-8).
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
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
// polls the ring before sleeping on its eventfd. Spinning trades a CPU core for lower
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

// WithName sets the client name the daemon logs: valid UTF-8 of at most 128 bytes. The
// default is the program name.
func WithName(name string) Option {
	return func(o *options) error {
		if len(name) > maxClientName {
			return fmt.Errorf("shmclient: WithName: name of %d bytes exceeds %d", len(name), maxClientName)
		}
		if !utf8.ValidString(name) {
			// The daemon would refuse the whole handshake (BAD_FRAME) for it.
			return fmt.Errorf("shmclient: WithName: name %q is not valid UTF-8", name)
		}
		o.name = name
		return nil
	}
}
