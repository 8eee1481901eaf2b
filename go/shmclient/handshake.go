package shmclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Dial connects to the daemon at socketPath (empty: DefaultSocketPath) and performs the
// handshake of SPEC §2.4: hello; welcome, which brings the session's segment and its four
// eventfds as descriptors; mapping the segment; attached; ready. ctx bounds the whole
// handshake.
func Dial(ctx context.Context, socketPath string, opts ...Option) (*Client, error) {
	o := defaultOptions()
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if socketPath == "" {
		socketPath = DefaultSocketPath()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%w: no tensord daemon at %s (start one with `python -m tensord serve`, or point TENSORD_SOCKET at its socket): %v", ErrClosed, socketPath, err)
		}
		if errors.Is(err, syscall.EACCES) {
			return nil, fmt.Errorf("%w: not allowed to connect to %s: add this user to the socket's group (the systemd unit uses tensord), or run as the daemon's user: %v", ErrPermission, socketPath, err)
		}
		return nil, fmt.Errorf("shmclient: dial %s: %w", socketPath, err)
	}
	c := &Client{
		opts:       o,
		conn:       conn,
		ringLock:   make(chan struct{}, 1),
		readerTok:  make(chan struct{}, 1),
		readerKick: make(chan struct{}, 1),
		pendingCtl: make(map[uint64]chan ctlResult),
		done:       make(chan struct{}),
	}
	if err := c.handshake(ctx); err != nil {
		conn.Close()
		if c.seg != nil {
			c.seg.release() // unmaps and closes the eventfds
		}
		if ctx.Err() != nil && !errors.As(err, new(*DaemonError)) {
			return nil, fmt.Errorf("shmclient: handshake with %s: %w", socketPath, ctx.Err())
		}
		return nil, fmt.Errorf("shmclient: handshake with %s: %w", socketPath, err)
	}
	c.seg.acquire() // the response reader's reference
	c.wg.Add(2)
	go c.readControl()
	go c.readResponses()
	// Prime the metadata cache so inputs are validated before they are written. A daemon
	// that cannot list models is still usable; the daemon validates everything anyway.
	if _, err := c.Models(ctx); err != nil && errors.Is(err, ErrClosed) {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (c *Client) handshake(ctx context.Context) error {
	// Deadlines on the socket make the blocking reads below honour ctx. The cancel hook
	// is fenced by a flag so that a cancel racing with success cannot poison the socket
	// for the session that follows.
	dl, _ := ctx.Deadline()
	c.conn.SetReadDeadline(dl)
	var hookMu sync.Mutex
	finished := false
	stop := context.AfterFunc(ctx, func() {
		hookMu.Lock()
		defer hookMu.Unlock()
		if !finished {
			c.conn.SetReadDeadline(time.Unix(1, 0))
		}
	})
	defer func() {
		stop()
		hookMu.Lock()
		finished = true
		hookMu.Unlock()
	}()

	err := c.writeMsgBy(&helloMsg{
		Type: "hello", MinVersion: protocolVersion, MaxVersion: protocolVersion,
		Client: c.opts.name, RequestRing: c.opts.requestRing, ResponseRing: c.opts.responseRing,
	}, dl)
	if err != nil {
		return err
	}
	w, fds, err := c.readWelcome()
	if err != nil {
		return err
	}
	c.welcome = *w
	if err := checkWelcome(w); err != nil {
		// The descriptors are ours until attachSegment takes them: every session refused
		// here would otherwise leave the daemon's segment and eventfds open in this process.
		closeFDs(fds)
		return err
	}
	seg, err := attachSegment(fds, w.SegmentSize)
	if err != nil {
		return err
	}
	c.seg = seg
	if err := seg.check(w); err != nil {
		return err
	}
	c.req = producer{
		r:     seg.ring(offReqControl, headerSize, w.RequestRing),
		data:  &seg.efds[efdReqData],
		space: &seg.efds[efdReqSpace],
		spin:  c.opts.spin,
	}
	c.resp = consumer{
		r:     seg.ring(offRespControl, headerSize+w.RequestRing, w.ResponseRing),
		data:  &seg.efds[efdRespData],
		space: &seg.efds[efdRespSpace],
		spin:  c.opts.spin,
	}
	if err := c.writeMsgBy(&typeOnlyMsg{Type: "attached"}, dl); err != nil {
		return err
	}
	if _, err := c.readHandshakeMsg("ready"); err != nil {
		return err
	}
	// Counters start where the daemon left them (0 for a fresh session).
	t := atomic.LoadUint64(c.req.r.tail)
	c.req.reserved, c.req.published = t, t
	h := atomic.LoadUint64(c.resp.r.head)
	c.resp.head, c.resp.readPos, c.resp.lastTail = h, h, h
	hookMu.Lock()
	defer hookMu.Unlock()
	finished = true
	if err := ctx.Err(); err != nil {
		return err
	}
	return c.conn.SetReadDeadline(time.Time{})
}

// checkWelcome checks what the welcome says before anything is mapped.
func checkWelcome(w *welcomeMsg) error {
	if w.Version != protocolVersion {
		return protocolErrorf("daemon chose protocol version %d, this client speaks %d", w.Version, protocolVersion)
	}
	return nil
}

// readWelcome reads the welcome and the descriptors that come with it (SPEC §2.4): exactly
// five, the segment and the eventfds rd, rs, pd, ps. On error every descriptor that
// arrived is closed.
func (c *Client) readWelcome() (*welcomeMsg, []int, error) {
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("shmclient: the control connection is a %T, not a Unix socket", c.conn)
	}
	body, fds, err := readFrameFDs(uc, maxFrame)
	if err != nil {
		closeFDs(fds)
		return nil, nil, handshakeReadErr(err, "welcome")
	}
	msg, err := handshakeMsg(body, "welcome")
	if err != nil {
		closeFDs(fds)
		return nil, nil, err
	}
	if len(fds) != 1+numEventfds {
		closeFDs(fds)
		return nil, nil, protocolErrorf("the welcome came with %d file descriptors, want %d (the session segment and 4 eventfds)", len(fds), 1+numEventfds)
	}
	return msg.(*welcomeMsg), fds, nil
}

func handshakeReadErr(err error, want string) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: the daemon closed the connection during the handshake (waiting for %s)", ErrClosed, want)
	}
	return err
}

func (c *Client) readHandshakeMsg(want string) (any, error) {
	body, err := readFrame(c.conn, maxFrame)
	if err != nil {
		return nil, handshakeReadErr(err, want)
	}
	return handshakeMsg(body, want)
}

// handshakeMsg decodes a handshake frame, turning a daemon error or goodbye into an error.
func handshakeMsg(body []byte, want string) (any, error) {
	typ, msg, err := decodeMessage(body)
	if err != nil {
		return nil, err
	}
	if e, ok := msg.(*errorMsg); ok {
		return nil, &DaemonError{Code: e.Code, Name: e.Name, Message: e.Message, Fatal: e.Fatal}
	}
	if typ == "goodbye" {
		return nil, fmt.Errorf("%w: %w: daemon said goodbye during the handshake: %s", ErrClosed, ErrShuttingDown, msg.(*goodbyeMsg).Reason)
	}
	if typ != want {
		return nil, protocolErrorf("expected %s during the handshake, got %s", want, typ)
	}
	return msg, nil
}
