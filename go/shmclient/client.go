package shmclient

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// The Client and its lifetime. The rest of the client is split by job:
//
//	handshake.go  Dial: hello, welcome (segment + eventfds), attached, ready
//	control.go    the control socket: reader goroutine, request/reply, Ping
//	models.go     model metadata and its cache
//	admin.go      Load, Unload, Reload
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

// Client is one session with the daemon. It is safe for concurrent use; share one
// Client between goroutines rather than dialling many (each session costs the daemon a
// shared-memory segment).
type Client struct {
	opts    options
	conn    net.Conn
	welcome welcomeMsg
	seg     *segment
	req     producer
	resp    consumer

	writeMu sync.Mutex // control-socket writes
	// ringLock admits one request-ring writer at a time, so at most one goroutine waits
	// for request-ring space (on the rs eventfd); a channel so that waiting honours ctx.
	ringLock chan struct{}
	nextID   atomic.Uint64 // ids of control messages

	// The response ring's reader role (see reader.go): held by a goroutine in Wait or by
	// readResponses; channels so that waiting for it composes with select.
	readerTok  chan struct{} // capacity 1: full while someone reads
	readerKick chan struct{} // capacity 1: wakes readResponses

	mu         sync.Mutex
	pendingCtl map[uint64]chan ctlResult
	calls      []*call       // every call this client made, indexed by slot (call.go)
	free       []*call       // calls not in use; the last one freed is reused first
	inFlight   int           // requests published whose responses have not been read
	waiters    int           // goroutines in Request.Wait
	closeErr   error         // set once, when the session ends
	done       chan struct{} // closed when the session ends
	closing    bool          // Close was called

	models atomic.Pointer[map[string]*ModelInfo]
	wg     sync.WaitGroup
}

// Session returns the session id the daemon assigned.
func (c *Client) Session() string { return c.welcome.Session }

// Daemon returns the daemon's name and version, e.g. "tensord 0.1.0".
func (c *Client) Daemon() string { return c.welcome.Daemon }

// RingSizes returns the capacities the daemon granted.
func (c *Client) RingSizes() (request, response int) {
	return int(c.welcome.RequestRing), int(c.welcome.ResponseRing)
}

// Err returns nil while the session is usable, else why it ended (wrapping ErrClosed).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}

// Done is closed when the session ends (Close, daemon exit, fatal error).
func (c *Client) Done() <-chan struct{} { return c.done }

// ended reports, without a lock, whether the session is over.
func (c *Client) ended() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// Close says goodbye and ends the session. Pending calls fail with ErrClosed. Views
// (Response outputs, Request inputs) stay readable until released: the segment is
// unmapped, and the session's eventfds closed, when the last one is. Close waits for the
// client's goroutines to exit; a Client that is closed and whose views are all released
// holds no descriptor.
func (c *Client) Close() error {
	c.mu.Lock()
	already := c.closeErr != nil || c.closing
	c.closing = true
	c.mu.Unlock()
	if !already {
		c.writeMsgBy(&goodbyeMsg{Type: "goodbye", Reason: "client closed"}, time.Now().Add(time.Second))
		c.shutdown(nil)
	}
	c.wg.Wait()
	return nil
}

// shutdown ends the session once: every pending and future call fails with err.
func (c *Client) shutdown(err error) {
	c.mu.Lock()
	if c.closeErr != nil {
		c.mu.Unlock()
		return
	}
	if err == nil {
		err = &closedError{msg: "shmclient: client closed"}
	}
	c.closeErr = err
	close(c.done)
	ctl := c.pendingCtl
	c.pendingCtl = map[uint64]chan ctlResult{}
	for _, cl := range c.calls {
		if cl.pending {
			// Taking it off pending makes this the one send on cl.ch (call.go), which
			// has room for it.
			cl.pending = false
			cl.ch <- err
		}
	}
	c.mu.Unlock()
	for _, ch := range ctl {
		ch <- ctlResult{err: err}
	}
	// Wake whoever sleeps on the client's two eventfds (the response reader, a writer
	// waiting for request space) so that they see the end at once. The client's own
	// segment reference, dropped below, keeps the eventfds open until then.
	c.resp.data.post()
	c.req.space.post()
	c.conn.Close()
	// The mapping and the eventfds outlive this reference while views or ring readers
	// hold theirs.
	c.seg.release()
}
