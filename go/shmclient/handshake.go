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
// handshake. Dial fails when the first session cannot be had (ErrUnavailable: no daemon
// at the socket), unless WithRetryOnFailedConnect; once it has a session, the Client
// reconnects by itself (WithReconnect).
func Dial(ctx context.Context, socketPath string, opts ...Option) (*Client, error) {
	o := defaultOptions()
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, notRun(err)
		}
	}
	if socketPath == "" {
		socketPath = DefaultSocketPath()
	}
	c := &Client{
		opts:      o,
		path:      socketPath,
		changed:   make(chan struct{}),
		done:      make(chan struct{}),
		superDone: make(chan struct{}),
	}
	c.closing, c.stopReconnect = context.WithCancel(context.Background())
	s, err := c.dialSession(ctx)
	if err != nil {
		if !o.retryOnFailedConnect || !o.reconnect || !Retryable(err) {
			c.stopReconnect()
			return nil, notRun(err)
		}
		// No daemon yet: the supervisor dials in the background, as after a lost session.
		c.lastErr, c.dialFailed = err, true
		s = noSession(&c.models, err)
	}
	c.cur.Store(s)
	go c.supervise()
	return c, nil
}

// dialSession connects and performs the handshake: a new session, serving, with the
// model metadata cache refreshed from its daemon.
func (c *Client) dialSession(ctx context.Context) (*session, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.path)
	if err != nil {
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
			return nil, fmt.Errorf("%w: not allowed to connect to %s: add this user to the socket's group (the systemd unit uses tensord), or run as the daemon's user: %v", ErrPermission, c.path, syscallErr(err))
		}
		return nil, &unavailableError{path: c.path, err: err}
	}
	s := &session{
		opts:       c.opts,
		models:     &c.models,
		conn:       conn,
		ringLock:   make(chan struct{}, 1),
		readerTok:  make(chan struct{}, 1),
		readerKick: make(chan struct{}, 1),
		pendingCtl: make(map[uint64]chan ctlResult),
		done:       make(chan struct{}),
		drainCh:    make(chan struct{}),
		idle:       make(chan struct{}, 1),
	}
	if err := s.handshake(ctx); err != nil {
		conn.Close()
		if s.seg != nil {
			s.seg.release() // unmaps and closes the eventfds
		}
		if ctx.Err() != nil && !errors.As(err, new(*DaemonError)) {
			return nil, fmt.Errorf("shmclient: handshake with %s: %w", c.path, ctx.Err())
		}
		return nil, fmt.Errorf("shmclient: handshake with %s: %w", c.path, err)
	}
	s.seg.acquire() // the response reader's reference
	s.wg.Add(2)
	go s.readControl()
	go s.readResponses()
	// Prime the metadata cache so inputs are validated before they are written: a new
	// daemon may serve other models, or other versions of them. A daemon that cannot list
	// models is still usable; the daemon validates everything anyway.
	c.models.store(nil)
	if _, err := s.listModels(ctx); err != nil && errors.Is(err, ErrClosed) {
		s.close(nil)
		return nil, err
	}
	return s, nil
}

func (s *session) handshake(ctx context.Context) error {
	// Deadlines on the socket make the blocking reads below honour ctx. The cancel hook
	// is fenced by a flag so that a cancel racing with success cannot poison the socket
	// for the session that follows.
	dl, _ := ctx.Deadline()
	s.conn.SetReadDeadline(dl)
	var hookMu sync.Mutex
	finished := false
	stop := context.AfterFunc(ctx, func() {
		hookMu.Lock()
		defer hookMu.Unlock()
		if !finished {
			s.conn.SetReadDeadline(time.Unix(1, 0))
		}
	})
	defer func() {
		stop()
		hookMu.Lock()
		finished = true
		hookMu.Unlock()
	}()

	err := s.writeMsgBy(&helloMsg{
		Type: "hello", MinVersion: minProtocolVersion, MaxVersion: protocolVersion,
		Client: s.opts.name, RequestRing: s.opts.requestRing, ResponseRing: s.opts.responseRing,
	}, dl)
	if err != nil {
		return err
	}
	w, fds, err := s.readWelcome()
	if err != nil {
		return err
	}
	s.welcome = *w
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
	s.seg = seg
	if err := seg.check(w); err != nil {
		return err
	}
	s.req = producer{
		r:     seg.ring(offReqControl, headerSize, w.RequestRing),
		data:  &seg.efds[efdReqData],
		space: &seg.efds[efdReqSpace],
		spin:  s.opts.spin,
	}
	s.resp = consumer{
		r:     seg.ring(offRespControl, headerSize+w.RequestRing, w.ResponseRing),
		data:  &seg.efds[efdRespData],
		space: &seg.efds[efdRespSpace],
		spin:  s.opts.spin,
	}
	if err := s.writeMsgBy(&typeOnlyMsg{Type: "attached"}, dl); err != nil {
		return err
	}
	if _, err := s.readHandshakeMsg("ready"); err != nil {
		return err
	}
	// Counters start where the daemon left them (0 for a fresh session).
	t := atomic.LoadUint64(s.req.r.tail)
	s.req.reserved, s.req.published = t, t
	h := atomic.LoadUint64(s.resp.r.head)
	s.resp.head, s.resp.readPos, s.resp.lastTail = h, h, h
	hookMu.Lock()
	defer hookMu.Unlock()
	finished = true
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.conn.SetReadDeadline(time.Time{})
}

// checkWelcome checks what the welcome says before anything is mapped.
func checkWelcome(w *welcomeMsg) error {
	if w.Version < minProtocolVersion || w.Version > protocolVersion {
		return protocolErrorf("daemon chose protocol version %d, this client speaks %d to %d", w.Version, minProtocolVersion, protocolVersion)
	}
	return nil
}

// readWelcome reads the welcome and the descriptors that come with it (SPEC §2.4): exactly
// five, the segment and the eventfds rd, rs, pd, ps. On error every descriptor that
// arrived is closed.
func (s *session) readWelcome() (*welcomeMsg, []int, error) {
	uc, ok := s.conn.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("shmclient: the control connection is a %T, not a Unix socket", s.conn)
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

func (s *session) readHandshakeMsg(want string) (any, error) {
	body, err := readFrame(s.conn, maxFrame)
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
		return nil, daemonError(e.Code, e.Name, e.Message, e.Fatal, e.Input, e.Item, e.Limit)
	}
	if typ == "goodbye" {
		return nil, fmt.Errorf("%w: %w: daemon said goodbye during the handshake: %s", ErrClosed, ErrShuttingDown, msg.(*goodbyeMsg).Reason)
	}
	if typ != want {
		return nil, protocolErrorf("expected %s during the handshake, got %s", want, typ)
	}
	return msg, nil
}
