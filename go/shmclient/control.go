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

func (c *Client) writeMsg(msg any) error { return c.writeMsgBy(msg, time.Time{}) }

// writeMsgBy writes one frame, giving up at deadline (zero: never).
func (c *Client) writeMsgBy(msg any, deadline time.Time) error {
	frame, err := appendFrame(nil, msg)
	if err != nil {
		return err
	}
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	c.conn.SetWriteDeadline(deadline)
	_, err = c.conn.Write(frame)
	return err
}

// readControl owns the socket's read side: it dispatches replies by id and turns EOF,
// read errors, fatal errors and goodbyes into the end of the session.
func (c *Client) readControl() {
	defer c.wg.Done()
	for {
		body, err := readFrame(c.conn, maxFrame)
		if err != nil {
			c.mu.Lock()
			closing := c.closing
			c.mu.Unlock()
			switch {
			case closing:
				c.shutdown(nil)
			case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET):
				c.shutdown(&closedError{msg: "shmclient: the daemon closed the connection (it exited, crashed or restarted); Dial again once it is running"})
			case errors.Is(err, ErrProtocol):
				c.shutdown(&closedError{msg: "shmclient: unreadable frame from the daemon, session closed", cause: err})
			default:
				c.shutdown(&closedError{msg: "shmclient: reading from the daemon failed, session closed", cause: err})
			}
			return
		}
		typ, msg, err := decodeMessage(body)
		if err != nil {
			c.shutdown(&closedError{msg: "shmclient: malformed message from the daemon, session closed", cause: err})
			return
		}
		switch m := msg.(type) {
		case *errorMsg:
			derr := &DaemonError{Code: m.Code, Name: m.Name, Message: m.Message, Fatal: m.Fatal}
			if m.ID != 0 {
				c.deliverCtl(m.ID, ctlResult{err: derr})
			}
			if m.Fatal {
				c.shutdown(&closedError{msg: "shmclient: the daemon ended the session with a fatal error", cause: derr})
				return
			}
		case *goodbyeMsg:
			c.shutdown(&closedError{msg: "shmclient: the daemon ended the session (goodbye: " + m.Reason + "); Dial again once it is running", cause: ErrShuttingDown})
			return
		case *idMsg:
			c.deliverCtl(m.ID, ctlResult{msg: m})
		case *modelListMsg:
			c.deliverCtl(m.ID, ctlResult{msg: m})
		default:
			c.shutdown(&closedError{msg: "shmclient: unexpected message from the daemon, session closed", cause: protocolErrorf("%s after the handshake", typ)})
			return
		}
	}
}

func (c *Client) deliverCtl(id uint64, r ctlResult) {
	c.mu.Lock()
	ch := c.pendingCtl[id]
	delete(c.pendingCtl, id)
	c.mu.Unlock()
	if ch != nil {
		ch <- r // buffered: never blocks
	}
}

// call sends a control request and waits for its reply.
func (c *Client) call(ctx context.Context, id uint64, msg any) (any, error) {
	ch := make(chan ctlResult, 1)
	c.mu.Lock()
	if c.closeErr != nil {
		err := c.closeErr
		c.mu.Unlock()
		return nil, err
	}
	c.pendingCtl[id] = ch
	c.mu.Unlock()
	dl, _ := ctx.Deadline() // zero (no deadline) when ctx has none
	if err := c.writeMsgBy(msg, dl); err != nil {
		// A failed write may have sent part of a frame: the stream cannot be trusted.
		c.shutdown(&closedError{msg: "shmclient: writing to the daemon failed, session closed", cause: err})
		c.mu.Lock()
		closeErr := c.closeErr
		c.mu.Unlock()
		return nil, closeErr
	}
	select {
	case r := <-ch:
		return r.msg, r.err
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pendingCtl, id)
		c.mu.Unlock()
		return nil, ctx.Err()
	}
}

// Ping round-trips a ping over the control socket.
func (c *Client) Ping(ctx context.Context) error {
	id := c.nextID.Add(1)
	msg, err := c.call(ctx, id, &idMsg{Type: "ping", ID: id})
	if err != nil {
		return fmt.Errorf("shmclient: ping: %w", err)
	}
	if m, ok := msg.(*idMsg); !ok || m.Type != "pong" {
		return fmt.Errorf("shmclient: ping: %w", protocolErrorf("reply is not a pong"))
	}
	return nil
}
