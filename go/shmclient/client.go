package shmclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

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

// ModelInfo is a model's metadata (SPEC §2.4 model info).
type ModelInfo struct {
	Name    string
	Version uint64
	Device  string
	Inputs  []TensorSpec
	Outputs []TensorSpec
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

	writeMu  sync.Mutex    // control-socket writes
	ringLock chan struct{} // one request-ring writer at a time; a channel so waiting honours ctx
	nextID   atomic.Uint64

	// The response ring's reader role (see reader.go): held by a goroutine in Wait or by
	// readResponses; channels so that waiting for it composes with select.
	readerTok  chan struct{} // capacity 1: full while someone reads
	readerKick chan struct{} // capacity 1: wakes readResponses

	mu         sync.Mutex
	pendingCtl map[uint64]chan ctlResult
	pendingReq map[uint64]chan reqResult
	inFlight   int           // requests published whose responses have not been read
	waiters    int           // goroutines in Request.Wait
	closeErr   error         // set once, when the session ends
	done       chan struct{} // closed when the session ends
	closing    bool          // Close was called

	models atomic.Pointer[map[string]*ModelInfo]
	wg     sync.WaitGroup
}

type ctlResult struct {
	msg any
	err error
}

type reqResult struct {
	resp *Response
	err  error
}

// Dial connects to the daemon at socketPath (empty: DefaultSocketPath) and performs the
// handshake of SPEC §2.4: hello, welcome, mapping the segment and opening the
// semaphores, attached, ready. ctx bounds the whole handshake.
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
		pendingReq: make(map[uint64]chan reqResult),
		done:       make(chan struct{}),
	}
	if err := c.handshake(ctx); err != nil {
		conn.Close()
		if c.seg != nil {
			c.seg.release()
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
	w, fd, err := c.readWelcome()
	if err != nil {
		return err
	}
	c.welcome = *w
	if err := checkWelcome(w); err != nil {
		// The descriptor is ours until mapSegment takes it: every session refused here
		// would otherwise leave the daemon's segment open in this process.
		syscall.Close(fd)
		return err
	}
	seg, err := mapSegment(fd, w.SegmentSize)
	if err != nil {
		return err
	}
	c.seg = seg
	if err := seg.check(w); err != nil {
		return err
	}
	for i, name := range w.Semaphores {
		s, err := openSemaphore(name)
		if err != nil {
			return err
		}
		seg.sems[i] = s
	}
	c.req = producer{
		r:        seg.ring(offReqControl, headerSize, w.RequestRing),
		dataSem:  seg.sems[semReqData],
		spaceSem: seg.sems[semReqSpace],
		spin:     c.opts.spin,
	}
	c.resp = consumer{
		r:        seg.ring(offRespControl, headerSize+w.RequestRing, w.ResponseRing),
		dataSem:  seg.sems[semRespData],
		spaceSem: seg.sems[semRespSpace],
		spin:     c.opts.spin,
	}
	if err := c.writeMsgBy(&typeOnlyMsg{Type: "attached"}, dl); err != nil {
		return err
	}
	if _, err := c.readHandshakeMsg("ready"); err != nil {
		return err
	}
	// Counters start where the daemon left them (0 for a fresh session).
	t := loadU64(c.req.r.tail)
	c.req.reserved, c.req.published = t, t
	h := loadU64(c.resp.r.head)
	c.resp.head, c.resp.readPos, c.resp.lastTail = h, h, h
	hookMu.Lock()
	defer hookMu.Unlock()
	finished = true
	if err := ctx.Err(); err != nil {
		return err
	}
	return c.conn.SetReadDeadline(time.Time{})
}

func loadU64(p *uint64) uint64 { return atomic.LoadUint64(p) }

// checkWelcome checks what the welcome says before anything is mapped or opened.
func checkWelcome(w *welcomeMsg) error {
	if w.Version != protocolVersion {
		return protocolErrorf("daemon chose protocol version %d, this client speaks %d", w.Version, protocolVersion)
	}
	if len(w.Semaphores) != 4 {
		return protocolErrorf("welcome lists %d semaphores, want 4", len(w.Semaphores))
	}
	// Names become paths under /dev/shm: refuse anything that could point elsewhere.
	for _, name := range w.Semaphores {
		if len(name) < 2 || name[0] != '/' || strings.ContainsAny(name[1:], "/\x00") || len(name) > 250 {
			return protocolErrorf("welcome names the semaphore %q, which is not a valid POSIX name", name)
		}
	}
	return nil
}

// readWelcome reads the welcome and the segment descriptor that comes with it (SPEC §2.4).
func (c *Client) readWelcome() (*welcomeMsg, int, error) {
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return nil, -1, fmt.Errorf("shmclient: the control connection is a %T, not a Unix socket", c.conn)
	}
	body, fds, err := readFrameFDs(uc, maxFrame)
	closeAll := func() {
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}
	if err != nil {
		closeAll()
		return nil, -1, handshakeReadErr(err, "welcome")
	}
	msg, err := handshakeMsg(body, "welcome")
	if err != nil {
		closeAll()
		return nil, -1, err
	}
	if len(fds) != 1 {
		closeAll()
		return nil, -1, protocolErrorf("the welcome came with %d file descriptors, want 1 (the session segment)", len(fds))
	}
	return msg.(*welcomeMsg), fds[0], nil
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

// Session returns the session id the daemon assigned.
func (c *Client) Session() string { return c.welcome.Session }

// Daemon returns the daemon's name and version, e.g. "tensord 0.1.0".
func (c *Client) Daemon() string { return c.welcome.Daemon }

// RingSizes returns the capacities the daemon granted.
func (c *Client) RingSizes() (request, response int) {
	return int(c.welcome.RequestRing), int(c.welcome.ResponseRing)
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
	ctl, req := c.pendingCtl, c.pendingReq
	c.pendingCtl, c.pendingReq = map[uint64]chan ctlResult{}, map[uint64]chan reqResult{}
	c.mu.Unlock()
	for _, ch := range ctl {
		ch <- ctlResult{err: err}
	}
	for _, ch := range req {
		ch <- reqResult{err: err}
	}
	// Wake a waiter reading the response ring, so that it sees the end at once instead
	// of at the end of its semaphore wait.
	c.resp.dataSem.post()
	c.conn.Close()
	// The client's own reference; the mapping outlives it while views exist.
	c.seg.release()
}

// Err returns nil while the session is usable, else why it ended (wrapping ErrClosed).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}

// Done is closed when the session ends (Close, daemon exit, fatal error).
func (c *Client) Done() <-chan struct{} { return c.done }

// Close says goodbye and ends the session. Pending calls fail with ErrClosed. Views
// (Response outputs, Request inputs) stay readable until released: the segment is
// unmapped when the last one is. Close waits for the client's goroutines to exit.
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

// Models lists the daemon's models, sorted by name, and refreshes the metadata the
// client validates inputs against.
func (c *Client) Models(ctx context.Context) ([]ModelInfo, error) {
	id := c.nextID.Add(1)
	msg, err := c.call(ctx, id, &idMsg{Type: "models", ID: id})
	if err != nil {
		return nil, fmt.Errorf("shmclient: models: %w", err)
	}
	ml, ok := msg.(*modelListMsg)
	if !ok {
		return nil, fmt.Errorf("shmclient: models: %w", protocolErrorf("reply is not a model_list"))
	}
	out := make([]ModelInfo, len(ml.Models))
	cache := make(map[string]*ModelInfo, len(ml.Models))
	for i, m := range ml.Models {
		out[i] = ModelInfo{Name: m.Name, Version: m.Version, Device: m.Device,
			Inputs: specsFromWire(m.Inputs), Outputs: specsFromWire(m.Outputs)}
		// The cache gets its own copy: the caller may modify what it is returned.
		cache[m.Name] = &ModelInfo{Name: m.Name, Version: m.Version, Device: m.Device,
			Inputs: specsFromWire(m.Inputs), Outputs: specsFromWire(m.Outputs)}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	c.models.Store(&cache)
	return out, nil
}

// specsFromWire keeps a dtype this client does not know as InvalidDType, which input
// validation treats like "any": the daemon still has the final word.
func specsFromWire(ws []wireSpec) []TensorSpec {
	out := make([]TensorSpec, len(ws))
	for i, w := range ws {
		dt, _ := ParseDType(w.DType)
		out[i] = TensorSpec{Name: w.Name, DType: dt, Shape: w.Shape}
	}
	return out
}

func (c *Client) modelInfo(name string) *ModelInfo {
	if m := c.models.Load(); m != nil {
		return (*m)[name]
	}
	return nil
}

// forgetModel drops cached metadata the daemon contradicted (unloaded or reloaded).
func (c *Client) forgetModel(name string) {
	for {
		old := c.models.Load()
		if old == nil || (*old)[name] == nil {
			return
		}
		m := make(map[string]*ModelInfo, len(*old))
		for k, v := range *old {
			if k != name {
				m[k] = v
			}
		}
		if c.models.CompareAndSwap(old, &m) {
			return
		}
	}
}
