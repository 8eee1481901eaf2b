package shmclient

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// backoff is a jittered, capped exponential backoff: each pause is the current wait times
// a random factor in [0.5, 1.5), at most the cap, and the wait doubles up to the cap. The
// jitter keeps the clients of a restarted daemon from dialling it in step. The zero value
// is ready for use once first and max are set (init).
type backoff struct {
	first, max, wait time.Duration
}

func (b *backoff) init(o *options) {
	b.first, b.max, b.wait = o.reconnectWait, o.maxReconnectWait, o.reconnectWait
}

func (b *backoff) reset() { b.wait = b.first }

// pause returns the next pause and doubles the wait.
func (b *backoff) pause() time.Duration {
	d := time.Duration(float64(b.wait) * (0.5 + rand.Float64()))
	d = min(d, b.max)
	b.wait = min(2*b.wait, b.max)
	return d
}

// again decides whether Infer makes a failed attempt again. A request that was never sent
// because its session ended or drained goes to the next session (WithReconnect): no
// pause, the wait for the session is the pause. With WithRetry, a request that certainly
// did not run and may succeed later is made again after a pause: the daemon was
// stopping (ErrShuttingDown) or its session ended (ErrClosed), when the Client
// reconnects; the model's queue was full (ErrOverloaded). Never once ctx has ended or the
// Client has.
func (c *Client) again(ctx context.Context, err error, b *backoff) bool {
	if ctx.Err() != nil || c.over() {
		return false
	}
	if isGone(err) && c.opts.reconnect {
		return true
	}
	transient := errors.Is(err, ErrOverloaded) ||
		c.opts.reconnect && (errors.Is(err, ErrShuttingDown) || errors.Is(err, ErrClosed))
	if !c.opts.retry || !transient || !SafeToRetry(err) {
		return false
	}
	if b.first == 0 {
		b.init(&c.opts)
	}
	return c.sleep(ctx, b.pause())
}

// replay decides whether Infer makes again a request to an idempotent model that may have
// run: only when its session ended under it (the daemon was killed or restarted; not an
// answer from the daemon, nor the caller's context), the Client reconnects, and
// WithIdempotentRetry is on. The next attempt waits for the new session within ctx.
func (c *Client) replay(ctx context.Context, err error) bool {
	if !c.opts.idempotentRetry || !c.opts.reconnect || ctx.Err() != nil || c.over() {
		return false
	}
	var de *DaemonError
	if errors.As(err, &de) && !de.Fatal {
		return false // the daemon answered it
	}
	return errors.Is(err, ErrMayHaveRun) && errors.Is(err, ErrClosed)
}

// sleep pauses for d, and reports false when ctx ends or the Client is closed first.
func (c *Client) sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-c.closing.Done():
		return false
	}
}

// over reports whether the Client has ended or is being closed.
func (c *Client) over() bool {
	select {
	case <-c.done:
		return true
	default:
		return c.closing.Err() != nil
	}
}
