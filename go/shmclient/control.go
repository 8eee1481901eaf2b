package shmclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"
)

// The control socket after the handshake: one goroutine reads it and routes replies by
// id; callers send a request and wait for its reply.

type ctlResult struct {
	msg any
	err error
}

// writeMsgBy writes one frame, giving up at deadline (zero: never).
func (s *session) writeMsgBy(msg any, deadline time.Time) error {
	frame, err := appendFrame(nil, msg)
	if err != nil {
		return err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	s.conn.SetWriteDeadline(deadline)
	_, err = s.conn.Write(frame)
	return err
}

// readControl owns the socket's read side: it dispatches replies by id and turns EOF,
// read errors, fatal errors and goodbyes into the end of the session.
func (s *session) readControl() {
	defer s.wg.Done()
	for {
		body, err := readFrame(s.conn, maxFrame)
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			switch {
			case closing:
				s.shutdown(nil)
			case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET):
				s.shutdown(&closedError{msg: "shmclient: the daemon closed the connection (it exited, crashed or restarted)" + s.redialHint()})
			case errors.Is(err, ErrProtocol):
				s.shutdown(&closedError{msg: "shmclient: unreadable frame from the daemon, session closed", cause: err})
			default:
				s.shutdown(&closedError{msg: "shmclient: reading from the daemon failed, session closed", cause: err})
			}
			return
		}
		typ, msg, err := decodeMessage(body)
		if err != nil {
			s.shutdown(&closedError{msg: "shmclient: malformed message from the daemon, session closed", cause: err})
			return
		}
		switch m := msg.(type) {
		case *errorMsg:
			derr := daemonError(m.Code, m.Name, m.Message, m.Fatal, m.Input, m.Item, m.Limit)
			if m.ID != 0 {
				s.deliverCtl(m.ID, ctlResult{err: derr})
			}
			if m.Fatal {
				s.shutdown(&closedError{msg: "shmclient: the daemon ended the session with a fatal error", cause: derr})
				return
			}
		case *goodbyeMsg:
			s.shutdown(&closedError{msg: "shmclient: the daemon ended the session (goodbye: " + m.Reason + ")" + s.redialHint(), cause: ErrShuttingDown})
			return
		case *idMsg:
			s.deliverCtl(m.ID, ctlResult{msg: m})
		case *modelListMsg:
			s.deliverCtl(m.ID, ctlResult{msg: m})
		case *modelStatsMsg:
			s.deliverCtl(m.ID, ctlResult{msg: m})
		case *healthReportMsg:
			s.deliverCtl(m.ID, ctlResult{msg: m})
		case *drainingMsg:
			s.startDraining()
		default:
			s.shutdown(&closedError{msg: "shmclient: unexpected message from the daemon, session closed", cause: protocolErrorf("%s after the handshake", typ)})
			return
		}
	}
}

// redialHint says what to do about a session that ended, when the Client does not do it.
func (s *session) redialHint() string {
	if s.opts.reconnect {
		return ""
	}
	return "; Dial again once it is running"
}

func (s *session) deliverCtl(id uint64, r ctlResult) {
	s.mu.Lock()
	ch := s.pendingCtl[id]
	delete(s.pendingCtl, id)
	s.checkIdleLocked()
	s.mu.Unlock()
	if ch != nil {
		ch <- r // buffered: never blocks
	}
}

// call sends a control request and waits for its reply. Its errors say whether the
// daemon may have acted on the request (SafeToRetry).
func (s *session) call(ctx context.Context, id uint64, msg any) (any, error) {
	ch := make(chan ctlResult, 1)
	s.mu.Lock()
	if s.closeErr != nil {
		err := s.closeErr
		s.mu.Unlock()
		return nil, &notRunError{err: err, gone: true}
	}
	s.pendingCtl[id] = ch
	s.mu.Unlock()
	dl, _ := ctx.Deadline() // zero (no deadline) when ctx has none
	if err := s.writeMsgBy(msg, dl); err != nil {
		// A failed write may have sent part of a frame: the stream cannot be trusted.
		s.shutdown(&closedError{msg: "shmclient: writing to the daemon failed, session closed", cause: err})
		return nil, mayHaveRun(s.Err())
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, mayHaveRun(r.err) // a DaemonError keeps its own answer
		}
		return r.msg, nil
	case <-ctx.Done():
		s.mu.Lock()
		delete(s.pendingCtl, id)
		s.checkIdleLocked()
		s.mu.Unlock()
		return nil, mayHaveRun(ctx.Err())
	}
}

// control runs a control request that only reads (models, ping, stats, health) on the
// current session, even a draining one: while the Client reconnects it waits for the
// next session, and when the session ends before the reply it asks the next one, since
// asking twice changes nothing.
func control[T any](ctx context.Context, c *Client, fn func(*session, context.Context) (T, error)) (T, error) {
	for {
		s, err := c.session(ctx, false)
		if err != nil {
			var zero T
			return zero, err
		}
		v, err := fn(s, ctx)
		if err == nil || !c.opts.reconnect || ctx.Err() != nil || !s.ended() || !errors.Is(err, ErrClosed) {
			return v, err
		}
	}
}

// Ping round-trips a ping over the control socket.
func (c *Client) Ping(ctx context.Context) error {
	_, err := control(ctx, c, (*session).ping)
	return err
}

func (s *session) ping(ctx context.Context) (struct{}, error) {
	id := s.nextID.Add(1)
	msg, err := s.call(ctx, id, &idMsg{Type: "ping", ID: id})
	if err != nil {
		return struct{}{}, fmt.Errorf("shmclient: ping: %w", err)
	}
	if m, ok := msg.(*idMsg); !ok || m.Type != "pong" {
		return struct{}{}, mayHaveRun(fmt.Errorf("shmclient: ping: %w", protocolErrorf("reply is not a pong")))
	}
	return struct{}{}, nil
}
