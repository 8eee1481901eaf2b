package shmclient

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
)

// The Client and its lifetime. The rest of the client is split by job:
//
//	session.go    one connection to the daemon and what lives as long as it
//	reconnect.go  replacing a session that ended, and waiting for one
//	retry.go      making a call again when that is safe (SafeToRetry)
//	handshake.go  Dial: hello, welcome (segment + eventfds), attached, ready
//	control.go    the control socket: reader goroutine, request/reply, Ping
//	models.go     model metadata and its cache
//	admin.go      Load, Unload, Reload
//	health.go     Health; stats.go  Stats
//	request.go    Request and Response (the zero-copy path) and Infer
//	call.go       the pooled per-request state behind them
//	reader.go     who reads the response ring, and parsing responses
//	ring.go       the rings and the wait protocol (SPEC §4.2–§4.7)
//	segment.go    the shared-memory segment and its reference count
//	eventfd.go    posting and waiting on the session's eventfds
//	frame.go, messages.go, desc.go, decode.go   the wire formats

// DefaultSocketPath returns the socket path of SPEC §2.1: $TENSORD_SOCKET if set, else
// /run/tensord/tensord.sock when /run/tensord exists, else /tmp/tensord.sock.
func DefaultSocketPath() string {
	if p := os.Getenv("TENSORD_SOCKET"); p != "" {
		return p
	}
	if st, err := os.Stat("/run/tensord"); err == nil && st.IsDir() {
		return "/run/tensord/tensord.sock"
	}
	return "/tmp/tensord.sock"
}

// Client is a connection to the daemon that outlives the daemon's restarts. It holds one
// session (SPEC §2.5) at a time; when the session ends (the daemon exited, crashed or was
// restarted, a fatal error) or the daemon says it is draining, the Client dials again with
// backoff, and calls made meanwhile wait for the new session within their own context
// instead of failing (see WithReconnect). It is safe for concurrent use; share one Client
// between goroutines rather than dialling many (each session costs the daemon a
// shared-memory segment).
type Client struct {
	opts   options
	path   string
	models modelCache
	cur    atomic.Pointer[session] // the latest session; never nil

	mu      sync.Mutex
	changed chan struct{} // closed, and replaced, when cur is replaced or the Client ends
	lastErr error         // why there is no usable session, while there is none
	err     error         // why the Client ended, once it has
	done    chan struct{} // closed when the Client ends
	closed  bool          // Close was called
	// closing is cancelled by Close: it stops the supervisor and a dial in progress.
	closing       context.Context
	stopReconnect context.CancelFunc
	superDone     chan struct{} // closed when the supervisor has returned

	inHandler atomic.Bool // the supervisor is running a handler (see Close)

	dialFailed bool // guarded by mu: the latest dial failed (WithFailFast)
	// Draining sessions that finish their requests in flight while new work goes to the
	// next session (reconnect.go, retire).
	retiring map[*session]struct{}
	retireWG sync.WaitGroup
}

// Connected reports whether the Client has a session that takes new requests now. False
// while it reconnects (the daemon restarts, is not up yet with WithRetryOnFailedConnect, or
// drains) and once it has ended; calls made then wait for a session within their context
// (or fail at once, WithFailFast).
func (c *Client) Connected() bool {
	return c.Err() == nil && c.cur.Load().takesWork()
}

// Session returns the id the daemon assigned to the current session (or, while the
// Client reconnects, to the last one).
func (c *Client) Session() string { return c.cur.Load().welcome.Session }

// Daemon returns the daemon's name and version, e.g. "tensord 0.1.0", as the current (or
// last) session's daemon said.
func (c *Client) Daemon() string { return c.cur.Load().welcome.Daemon }

// RingSizes returns the capacities the daemon granted the current (or last) session.
func (c *Client) RingSizes() (request, response int) {
	w := &c.cur.Load().welcome
	return int(w.RequestRing), int(w.ResponseRing)
}

// Err returns nil while the Client is usable, connected or reconnecting, else why it
// ended for good (wrapping ErrClosed): Close was called; with WithReconnect(false) its
// session ended; or reconnecting failed WithMaxReconnects times in a row.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the Client ends for good (see Err). A session that ends while the
// Client reconnects does not close it.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close says goodbye to the daemon and ends the Client: reconnecting stops, and pending
// and later calls fail with ErrClosed. Views (Response outputs, Request inputs) stay
// readable until released: a session's segment is unmapped, and its eventfds closed,
// when the last one is. Close waits for the Client's goroutines to exit, except for a
// disconnect or reconnect handler running at the time (which may itself call Close); a
// Client that is closed and whose views are all released holds no descriptor.
func (c *Client) Close() error {
	c.mu.Lock()
	first := !c.closed
	if first {
		c.closed = true
		c.stopReconnect()
	}
	s := c.cur.Load() // final: the supervisor installs no session once closing is cancelled
	c.mu.Unlock()
	s.close(nil)
	if first {
		if !c.inHandler.Load() {
			<-c.superDone
		}
		c.retireWG.Wait() // each closes its draining session on closing
		c.finish(errClientClosed)
	}
	return nil
}

// finish ends the Client once, with err.
func (c *Client) finish(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	close(c.done)
	close(c.changed)
}

// session returns the session new work goes to, waiting for one while the Client
// reconnects. work: a request for the rings, which a draining session does not take;
// control messages may still use a draining session.
func (c *Client) session(ctx context.Context, work bool) (*session, error) {
	s := c.cur.Load()
	if s.takesWork() || !work && !s.ended() {
		return s, nil
	}
	return c.waitSession(ctx, work)
}
