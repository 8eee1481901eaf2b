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

	reconnect        bool
	reconnectWait    time.Duration
	maxReconnectWait time.Duration
	maxReconnects    int
	onDisconnect     func(error)
	onReconnect      func()
	retry            bool

	retryOnFailedConnect bool
	failFast             bool
	idempotentRetry      bool
}

// Reconnect defaults: the first pause between attempts, and the cap the pauses double
// up to.
const (
	DefaultReconnectWait    = 50 * time.Millisecond
	DefaultMaxReconnectWait = 2 * time.Second
)

// maxClientName is hello's limit on the client name (SPEC §2.4), in bytes.
const maxClientName = 128

func defaultOptions() options {
	return options{name: defaultName(os.Args), reconnect: true, reconnectWait: DefaultReconnectWait,
		maxReconnectWait: DefaultMaxReconnectWait, maxReconnects: -1, idempotentRetry: true}
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

// WithReconnect turns reconnecting on (the default) or off. On, when the session ends
// (the daemon exited, crashed, restarted or said goodbye, or a fatal error) or the daemon
// says it is draining, the Client dials again with backoff (WithReconnectWait,
// WithMaxReconnectWait) until it has a new session or WithMaxReconnects attempts in a row
// failed. Calls made meanwhile (Infer, NewRequest, Models, Health, ...) wait for the new
// session within their context instead of failing; the model metadata is fetched again
// from the new daemon. Requests already sent when a session ends fail (ErrClosed,
// ErrMayHaveRun); on a draining session they finish first. Off, the Client ends with its
// session (Done, Err), and calls fail at once once it has.
func WithReconnect(on bool) Option {
	return func(o *options) error {
		o.reconnect = on
		return nil
	}
}

// WithReconnectWait sets the first pause between attempts to reconnect (default 50ms).
// Each failed attempt doubles it, up to WithMaxReconnectWait, and every pause is jittered
// by ±50% so that the clients of a restarted daemon do not dial it in step. The first
// attempt after a session that served a while is made at once.
func WithReconnectWait(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("shmclient: WithReconnectWait(%v): must be positive", d)
		}
		o.reconnectWait = d
		return nil
	}
}

// WithMaxReconnectWait caps the pause between attempts to reconnect (default 2s).
func WithMaxReconnectWait(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("shmclient: WithMaxReconnectWait(%v): must be positive", d)
		}
		o.maxReconnectWait = d
		return nil
	}
}

// WithMaxReconnects sets how many attempts to reconnect may fail in a row before the
// Client gives up and ends (Done, Err; calls fail with ErrClosed and, when no daemon was
// there, ErrUnavailable). -1, the default, never gives up; 0 gives up at once.
func WithMaxReconnects(n int) Option {
	return func(o *options) error {
		if n < -1 {
			return fmt.Errorf("shmclient: WithMaxReconnects(%d): use -1 for no limit", n)
		}
		o.maxReconnects = n
		return nil
	}
}

// WithDisconnectHandler sets a function called, with the reason, when a session stops
// taking new calls: it ended (the error matches ErrClosed), or the daemon is draining
// (it matches ErrShuttingDown). It is called once per session, not for Close, on the
// Client's reconnecting goroutine: keep it short, since reconnecting waits for it.
func WithDisconnectHandler(f func(err error)) Option {
	return func(o *options) error {
		o.onDisconnect = f
		return nil
	}
}

// WithReconnectHandler sets a function called each time the Client has a new session,
// after its model metadata was fetched, on the Client's reconnecting goroutine.
func WithReconnectHandler(f func()) Option {
	return func(o *options) error {
		o.onReconnect = f
		return nil
	}
}

// WithRetry makes Infer make a failed call again, within its context and after a backoff pause (WithReconnectWait, WithMaxReconnectWait),
// when the error says that it certainly did not run (SafeToRetry) and that it may succeed
// later: the daemon was stopping (ErrShuttingDown) or its session ended before the call
// was sent (ErrClosed), while the Client reconnects; or the model's queue was full
// (ErrOverloaded). Default off: such errors are returned. A call that may have run
// (ErrMayHaveRun) is never made again. The zero-copy path (NewRequest, Request) is not
// retried: its inputs live in the session they were written to.
func WithRetry(on bool) Option {
	return func(o *options) error {
		o.retry = on
		return nil
	}
}

// WithRetryOnFailedConnect makes Dial succeed when the daemon is not there yet (nats.go's
// RetryOnFailedConnect): a service started before tensord, or while it restarts, gets a
// Client that connects in the background with backoff, as after a lost session
// (WithReconnectWait, WithMaxReconnects). Calls made meanwhile wait for the session within
// their context, or fail at once with WithFailFast; Connected tells which state the Client
// is in, and the reconnect handler runs when the first session is had. Only failures that
// may go away are waited out (Retryable: nothing listens at the socket, the daemon is
// stopping or short of memory); a refused permission or protocol version still fails Dial.
// Default off: Dial fails when the first session cannot be had.
func WithRetryOnFailedConnect(on bool) Option {
	return func(o *options) error {
		o.retryOnFailedConnect = on
		return nil
	}
}

// WithFailFast makes calls fail at once, instead of waiting within their context, while
// the Client has no session and its last attempt to dial one failed (the daemon is down):
// for callers that would rather answer "unavailable" (HTTP 503) now than wait out their
// deadline during an outage. The error matches ErrUnavailable and is safe to retry. A
// session being replaced with a dial still under way (a restart, a zero-downtime upgrade)
// is waited for as usual: fail-fast only starts once a dial has failed. Default off.
func WithFailFast(on bool) Option {
	return func(o *options) error {
		o.failFast = on
		return nil
	}
}

// WithIdempotentRetry controls whether Infer makes again, once, on the next session, a
// request to an idempotent model (ModelInfo.Idempotent, the model's config says so) that
// may have run because its session ended before the response was read: the daemon was
// killed or restarted under it (SPEC §6 "Idempotent models"). Running it twice has the
// effect of running it once, so the caller gets its answer instead of ErrMayHaveRun.
// Requests the daemon answered with an error, requests to other models and the zero-copy
// path (NewRequest) are never made again. Default on.
func WithIdempotentRetry(on bool) Option {
	return func(o *options) error {
		o.idempotentRetry = on
		return nil
	}
}
