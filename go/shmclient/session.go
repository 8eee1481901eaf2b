package shmclient

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// session is one connection to the daemon and everything that lives exactly as long as
// it (SPEC §2.5): the control socket, the shared-memory segment with its rings and
// eventfds, the calls in flight. A Client holds one session at a time and replaces it
// when it ends (reconnect.go). Requests and Responses point at the session they were made
// in, so a caller's views of an old session stay valid after the Client has moved on.
type session struct {
	opts    options
	models  *modelCache // the Client's, refreshed by this session's model_list replies
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
	calls      []*call       // every call this session made, indexed by slot (call.go)
	free       []*call       // calls not in use; the last one freed is reused first
	inFlight   int           // requests published whose responses have not been read
	waiters    int           // goroutines in Request.Wait
	closeErr   error         // set once, when the session ends
	done       chan struct{} // closed when the session ends
	closing    bool          // close was called

	// draining: the daemon said it is stopping (SPEC draining). Set under mu, so that a
	// request is either published before it (and counted in inFlight) or never; read
	// without the lock by the Client when it picks a session for new work.
	draining atomic.Bool
	drainCh  chan struct{} // closed when draining is set
	// idle is posted when the session drains and has nothing left in flight: the Client
	// may then end it without waiting for the daemon's goodbye.
	idle chan struct{}
	wg   sync.WaitGroup // the session's goroutines: readControl, readResponses

	placeholder bool // noSession: stands in for the first session, not had yet
}

// noSession is the Client's current session before its first one (WithRetryOnFailedConnect):
// ended, with why, so every call waits for the next session or fails with the reason.
func noSession(models *modelCache, why error) *session {
	s := &session{models: models, done: make(chan struct{}), drainCh: make(chan struct{}),
		idle: make(chan struct{}, 1), pendingCtl: map[uint64]chan ctlResult{}, closing: true,
		placeholder: true,
		closeErr:    &closedError{msg: "shmclient: not connected to the daemon yet", cause: why}}
	close(s.done)
	return s
}

// Err returns nil while the session is usable, else why it ended (wrapping ErrClosed).
func (s *session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closeErr
}

// ended reports, without a lock, whether the session is over.
func (s *session) ended() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// takesWork reports whether new requests may be sent on the session: it has not ended
// and the daemon has not said it is draining.
func (s *session) takesWork() bool { return !s.draining.Load() && !s.ended() }

// startDraining marks the session as draining (the daemon's draining message).
func (s *session) startDraining() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining.Load() {
		return
	}
	s.draining.Store(true)
	close(s.drainCh)
	s.checkIdleLocked()
}

// checkIdleLocked posts idle when the session drains and nothing is left in flight:
// every published request answered, every control request replied to. s.mu is held.
func (s *session) checkIdleLocked() {
	if s.draining.Load() && s.inFlight == 0 && len(s.pendingCtl) == 0 {
		select {
		case s.idle <- struct{}{}:
		default:
		}
	}
}

// isIdle reports what checkIdleLocked posts, under the lock.
func (s *session) isIdle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining.Load() && s.inFlight == 0 && len(s.pendingCtl) == 0
}

// close says goodbye and ends the session (err: why, nil for the Client's Close). Pending
// calls fail with err. Views (Response outputs, Request inputs) stay readable until
// released: the segment is unmapped, and the session's eventfds closed, when the last one
// is. close waits for the session's goroutines to exit.
func (s *session) close(err error) {
	s.mu.Lock()
	already := s.closeErr != nil || s.closing
	s.closing = true
	s.mu.Unlock()
	if !already {
		s.writeMsgBy(&goodbyeMsg{Type: "goodbye", Reason: "client closed"}, time.Now().Add(time.Second))
		s.shutdown(err)
	}
	s.wg.Wait()
}

// shutdown ends the session once: every pending and future call fails with err.
func (s *session) shutdown(err error) {
	s.mu.Lock()
	if s.closeErr != nil {
		s.mu.Unlock()
		return
	}
	if err == nil {
		err = errClientClosed
	}
	s.closeErr = err
	close(s.done)
	ctl := s.pendingCtl
	s.pendingCtl = map[uint64]chan ctlResult{}
	for _, cl := range s.calls {
		if cl.pending {
			// Taking it off pending makes this the one send on cl.ch (call.go), which
			// has room for it.
			cl.pending = false
			cl.ch <- err
		}
	}
	s.mu.Unlock()
	for _, ch := range ctl {
		ch <- ctlResult{err: err}
	}
	// Wake whoever sleeps on the session's two eventfds (the response reader, a writer
	// waiting for request space) so that they see the end at once. The session's own
	// segment reference, dropped below, keeps the eventfds open until then.
	s.resp.data.post()
	s.req.space.post()
	s.conn.Close()
	// The mapping and the eventfds outlive this reference while views or ring readers
	// hold theirs.
	s.seg.release()
}
