package shmclient

import (
	"context"
	"fmt"
	"time"
)

// Reconnecting. Each Client has one supervisor goroutine. It watches the current
// session; when the daemon says it is draining, new work stops going to the session
// (takesWork) and the supervisor dials the next one at once, while the requests in flight
// finish on the draining session in the background (retire), which the Client ends with
// its own goodbye once nothing is left in flight. With a zero-downtime restart the new
// daemon already listens, so new work waits only for one handshake. When the session has
// ended (the daemon's goodbye or death, a fatal error), the supervisor dials again with
// backoff and installs the new session, which wakes every call waiting for one. With
// WithReconnect(false) it ends the Client instead.

// redialTimeout bounds one dial and handshake while reconnecting: a daemon that accepts
// but does not answer (still starting, or wedged) is given up on and dialled again.
const redialTimeout = 10 * time.Second

// waitSession waits for a session while the Client reconnects (see Client.session).
func (c *Client) waitSession(ctx context.Context, work bool) (*session, error) {
	for {
		c.mu.Lock()
		s := c.cur.Load()
		if s.takesWork() || !work && !s.ended() {
			c.mu.Unlock()
			return s, nil
		}
		if err := c.err; err != nil {
			c.mu.Unlock()
			return nil, notRun(err)
		}
		if !c.opts.reconnect {
			// No session will come: say why there is none.
			c.mu.Unlock()
			if err := s.Err(); err != nil {
				return nil, notRun(err)
			}
			return nil, notRun(errDraining)
		}
		if c.opts.failFast && c.dialFailed {
			last := c.lastErr
			c.mu.Unlock()
			return nil, &noSessionError{last: last}
		}
		changed := c.changed
		c.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			c.mu.Lock()
			last := c.lastErr
			c.mu.Unlock()
			return nil, &noSessionError{ctxErr: ctx.Err(), last: last}
		}
	}
}

// supervise runs until the Client ends: see the comment at the top of the file.
func (c *Client) supervise() {
	defer close(c.superDone)
	var b backoff
	b.init(&c.opts)
	s := c.cur.Load()
	since := time.Now()
	for {
		select {
		case <-s.drainCh:
		case <-s.done:
		case <-c.closing.Done():
			return
		}
		if c.closing.Err() != nil {
			return
		}
		why := s.Err()
		if why == nil {
			why = errDraining
		}
		c.setLastErr(why)
		if h := c.opts.onDisconnect; h != nil && !s.placeholder {
			c.runHandler(func() { h(why) })
		}
		if !c.opts.reconnect {
			if c.waitEnd(s) {
				c.finish(s.Err())
			}
			return
		}
		if !s.ended() {
			c.retire(s) // draining: it finishes its requests while the next session is dialled
		} else {
			c.setLastErr(s.Err())
		}
		// A session that served a while starts the backoff afresh, with an immediate
		// dial; one that ended soon after it began (a daemon that keeps failing, or
		// drains new sessions at once) goes on backing off.
		immediate := time.Since(since) >= b.max
		if immediate {
			b.reset()
		}
		ns := c.redial(&b, immediate)
		if ns == nil {
			return
		}
		c.mu.Lock()
		if c.closing.Err() != nil {
			c.mu.Unlock()
			ns.close(nil)
			return
		}
		c.cur.Store(ns)
		c.lastErr, c.dialFailed = nil, false
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
		s, since = ns, time.Now()
		if h := c.opts.onReconnect; h != nil {
			c.runHandler(h)
		}
	}
}

// waitEnd waits for s to end, ending it itself once it drains with nothing left in
// flight. It reports false when the Client is closed first.
func (c *Client) waitEnd(s *session) bool {
	for {
		select {
		case <-s.done:
			return true
		case <-s.idle:
			if s.isIdle() {
				s.close(&closedError{msg: "shmclient: the daemon is draining (stopping); session ended by the client with nothing left in flight", cause: ErrShuttingDown})
			}
		case <-c.closing.Done():
			return false
		}
	}
}

// redial dials until a session is had, pausing between attempts (and before the first
// unless immediate). It returns nil when the Client is closed meanwhile, or when it gave
// up after WithMaxReconnects failed attempts, having ended the Client.
func (c *Client) redial(b *backoff, immediate bool) *session {
	for attempts := 0; ; attempts++ {
		if max := c.opts.maxReconnects; max >= 0 && attempts >= max {
			c.mu.Lock()
			last := c.lastErr
			c.mu.Unlock()
			c.finish(&closedError{msg: fmt.Sprintf("shmclient: gave up reconnecting after %d attempts", attempts), cause: last})
			return nil
		}
		if (attempts > 0 || !immediate) && !c.sleep(context.Background(), b.pause()) {
			return nil
		}
		ctx, cancel := context.WithTimeout(c.closing, redialTimeout)
		s, err := c.dialSession(ctx)
		cancel()
		if err == nil {
			return s
		}
		if c.closing.Err() != nil {
			return nil
		}
		c.mu.Lock()
		c.lastErr, c.dialFailed = err, true
		c.mu.Unlock()
	}
}

// retire lets a draining session finish its requests in flight in the background, and
// ends it (waitEnd) once it has none, or when the Client is closed.
func (c *Client) retire(s *session) {
	c.mu.Lock()
	if c.retiring == nil {
		c.retiring = make(map[*session]struct{})
	}
	c.retiring[s] = struct{}{}
	c.retireWG.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.retireWG.Done()
		if !c.waitEnd(s) {
			s.close(nil)
		}
		c.mu.Lock()
		delete(c.retiring, s)
		c.mu.Unlock()
	}()
}

func (c *Client) setLastErr(err error) {
	c.mu.Lock()
	c.lastErr = err
	c.mu.Unlock()
}

// runHandler runs a disconnect or reconnect handler, letting Close know that it must not
// wait for the supervisor meanwhile (the handler may be the one calling it).
func (c *Client) runHandler(f func()) {
	c.inHandler.Store(true)
	defer c.inHandler.Store(false)
	f()
}
