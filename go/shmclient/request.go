package shmclient

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"strconv"
	"time"
	"unsafe"
)

// Request is a request record reserved in the request ring (the zero-copy path). Fill
// the inputs in place through Input(i), then call Do (or Send and Wait), or Abandon.
// Until then, later requests of the same Client cannot be published (the ring publishes
// in order, SPEC §4.7), so fill promptly; a Request that is dropped without either
// stalls the Client. A Request is for use by one goroutine.
//
// Request is a small value, a handle: copies name the same request. The client reuses
// the memory behind a request once it has ended (Abandon, an error from Send, Wait or
// Do, or the Response's Release); after that every method of every copy refuses to act
// (errors, Input panics, Abandon does nothing), so a stale handle cannot touch a later
// request. The zero Request is not a request.
type Request struct {
	cl   *call
	life uint64
}

// Response holds a request's outputs as views into the response ring. They are valid
// until Release, which frees the ring space; release every Response, or the daemon runs
// out of room for responses and stalls. Like Request, a Response is a handle: copies
// name the same response, and once one of them is released the others' Release does
// nothing. The zero Response has no outputs; releasing it does nothing.
type Response struct {
	Outputs []Tensor

	cl   *call
	life uint64
}

// Output returns the output called name, or false.
func (r Response) Output(name string) (Tensor, bool) {
	for _, t := range r.Outputs {
		if t.Name == name {
			return t, true
		}
	}
	return Tensor{}, false
}

// Release gives the outputs' ring space back to the daemon, where the next responses
// are written. It empties Outputs, so that a use after Release finds nothing instead of
// another request's bytes; copies of the Response or of its Tensors taken before must not
// be used either (their memory now belongs to later responses). Calling it again, on
// this Response or a copy, is a no-op.
func (r *Response) Release() {
	r.Outputs = nil
	cl := r.cl
	if cl == nil || !cl.end(r.life) {
		return
	}
	s := cl.s
	s.resp.release(cl.seq)
	s.seg.release() // the views' reference
	s.recycle(cl)
}

// call returns the call if the handle is still current, else nil.
func (r Request) call() *call {
	if r.cl == nil || r.cl.life.Load() != r.life {
		return nil
	}
	return r.cl
}

var errStaleRequest = errors.New("shmclient: Request used after it ended (Abandon, an error, or its Response's Release)")

// NewRequest reserves a record for model with inputs of the given specs and returns it
// with each input's Data pointing into shared memory, to be filled in place (the memory
// holds stale bytes until then). It validates the specs like Infer and waits for ring
// space, and while the Client reconnects for the next session, as long as ctx allows.
//
// The record belongs to the session it was reserved in. If that session ends, or its
// daemon starts draining, before Send, Send fails without sending it (the error matches
// ErrClosed or ErrShuttingDown, and SafeToRetry reports true): make a new Request, which
// goes to the next session.
func (c *Client) NewRequest(ctx context.Context, model string, specs ...TensorSpec) (Request, error) {
	return c.newRequest(ctx, model, specs)
}

// newRequest reserves a record in a session that takes work, waiting for one while the
// Client reconnects, and reserving again in the next session when the one it found ends
// before the record could be reserved.
func (c *Client) newRequest(ctx context.Context, model string, specs []TensorSpec) (Request, error) {
	for {
		s := c.cur.Load()
		if !s.takesWork() {
			// Refuse what no session would take before waiting for one.
			if err := checkSpecs(model, specs, nil); err != nil {
				return Request{}, notRun(err)
			}
			var err error
			if s, err = c.waitSession(ctx, true); err != nil {
				return Request{}, err
			}
		}
		req, err := s.newRequest(ctx, model, specs)
		if err == nil || !c.opts.reconnect || ctx.Err() != nil || !isGone(err) {
			return req, err
		}
	}
}

// Input returns input i (in the order given to NewRequest); its Data is the record's
// shared memory, valid until Send/Do or Abandon. After those Input panics: the memory
// then belongs to the daemon, or to a later request.
func (r Request) Input(i int) Tensor {
	cl := r.call()
	if cl == nil || cl.state != stateReserved {
		panic("shmclient: Request.Input called after Send, Do or Abandon")
	}
	return cl.inputs[i]
}

// NumInputs returns the number of inputs, 0 after Send, Do or Abandon.
func (r Request) NumInputs() int {
	cl := r.call()
	if cl == nil || cl.state != stateReserved {
		return 0
	}
	return len(cl.inputs)
}

// Do publishes the request and waits for its response: Send, then Wait.
func (r Request) Do(ctx context.Context) (Response, error) {
	if err := r.Send(ctx); err != nil {
		return Response{}, err
	}
	return r.Wait(ctx)
}

// Send publishes the request without waiting, so a goroutine can have several requests
// in flight; every Send must be followed by Wait, which also frees the response. ctx's
// deadline becomes the request's time budget in the daemon. After Send the inputs
// belong to the daemon and must not be touched. An error ends the request (it is
// abandoned).
func (r Request) Send(ctx context.Context) error {
	cl := r.call()
	if cl == nil {
		return notRun(errStaleRequest)
	}
	if cl.state != stateReserved {
		return notRun(errors.New("shmclient: Request.Send called after Send"))
	}
	s := cl.s
	var timeoutUS uint64
	if dl, ok := ctx.Deadline(); ok {
		d := time.Until(dl)
		if d <= 0 {
			err := notRun(fmt.Errorf("shmclient: model %q: %w", cl.model, context.DeadlineExceeded))
			r.Abandon()
			return err
		}
		timeoutUS = uint64((d + time.Microsecond - 1) / time.Microsecond)
	}
	if err := ctx.Err(); err != nil {
		err = notRun(fmt.Errorf("shmclient: model %q: %w", cl.model, err))
		r.Abandon()
		return err
	}

	// The descriptor is encoded once, straight into the record, now that timeout_us is
	// known. The layout left room for the longest timeout encoding, so the offsets stay
	// valid; the length check catches requestDescLen and appendRequestDesc disagreeing
	// (a bug) before it could publish a torn record.
	cl.desc.TimeoutUS = timeoutUS
	cl.desc.Priority = uint64(priorityFrom(ctx))
	room := cl.rec[recordHeaderSize:recordHeaderSize:cl.dataStart]
	n := requestDescLen(&cl.desc)
	if n > cap(room) || len(appendRequestDesc(room, &cl.desc)) != n {
		r.Abandon()
		return notRun(fmt.Errorf("shmclient: internal error: descriptor of %d bytes does not fit its reserved %d", n, cap(room)))
	}
	putRecordHeader(cl.rec, recordHeader{Len: uint32(len(cl.rec)), Kind: kindRequest, RequestID: cl.id, DescLen: uint32(n)})

	// Published or not is decided under the lock that orders it with the session's end
	// and with the daemon's draining message: a request published before either is in
	// flight (and counted); one after is never sent.
	s.mu.Lock()
	if s.closeErr != nil || s.draining.Load() {
		var err error
		if s.closeErr != nil {
			err = &notRunError{err: fmt.Errorf("shmclient: model %q: not sent: %w", cl.model, s.closeErr), gone: true}
		} else {
			err = &notRunError{err: fmt.Errorf("shmclient: model %q: not sent: %w", cl.model, errDraining), gone: true}
		}
		s.mu.Unlock()
		r.Abandon()
		return err
	}
	cl.pending = true
	s.inFlight++
	s.mu.Unlock()
	cl.state = stateSent
	cl.rec = nil
	s.req.commit(cl.pos, false)
	s.seg.release() // the record is the daemon's now; our input views are dead
	return nil
}

// Wait waits for the response of a sent request. If ctx ends first, Wait returns ctx's
// error at once; the response, when it comes, is released by the client. An error ends
// the request.
func (r Request) Wait(ctx context.Context) (Response, error) {
	cl := r.call()
	if cl == nil {
		return Response{}, mayHaveRun(errStaleRequest)
	}
	if cl.state != stateSent {
		return Response{}, mayHaveRun(errors.New("shmclient: Request.Wait called without Send, or twice"))
	}
	cl.state = stateWaiting
	s := cl.s
	s.enterWait()
	defer s.leaveWait()
	// Read the response ring ourselves when nobody else is (reader.go); otherwise
	// whoever is delivers on cl.ch.
	select {
	case err := <-cl.ch:
		return r.finish(err)
	case s.readerTok <- struct{}{}:
		// The previous reader may have delivered ours just before handing over (select
		// picks among ready cases at random). Nobody else reads while we hold the
		// token, so if cl.ch is empty now, the response is still to come.
		var err error
		ok := true
		select {
		case err = <-cl.ch:
		default:
			err, ok = s.readFor(ctx, cl)
		}
		<-s.readerTok
		if ok {
			return r.finish(err)
		}
		// Only the end of ctx or of the session stops a reader short; the latter's
		// error comes on cl.ch.
		select {
		case err := <-cl.ch:
			return r.finish(err)
		case <-ctx.Done():
		}
	case <-ctx.Done():
	}
	s.mu.Lock()
	pending := cl.pending
	cl.pending = false
	s.mu.Unlock()
	if !pending {
		// A reader already took it: its verdict is (being) sent on cl.ch.
		if err := <-cl.ch; err == nil {
			s.resp.release(cl.seq)
			s.seg.release()
		}
	}
	// Otherwise whoever reads the response finds no waiter and releases it on arrival
	// (readResponses, kicked as this Wait returns, if no other Wait is reading). Either
	// way nothing more will be sent on cl.ch.
	err := mayHaveRun(fmt.Errorf("shmclient: model %q: %w", cl.model, ctx.Err()))
	if cl.end(r.life) {
		s.recycle(cl)
	}
	return Response{}, err
}

// finish turns the verdict on a response into Wait's result: the daemon's error, which
// says itself whether the model ran, or the session's end or an unusable response, after
// which it may have.
func (r Request) finish(err error) (Response, error) {
	cl := r.cl
	if err != nil {
		if errors.Is(err, ErrUnknownModel) {
			cl.s.models.forget(cl.model)
		}
		if cl.end(r.life) {
			cl.s.recycle(cl)
		}
		return Response{}, mayHaveRun(err)
	}
	cl.state = stateAnswered
	return Response{Outputs: cl.outputs, cl: cl, life: r.life}, nil
}

// Abandon gives the reservation up: it becomes a PAD record the daemon skips, and the
// request ends. It is a no-op after Send (or Do) or a previous Abandon.
func (r Request) Abandon() {
	cl := r.call()
	if cl == nil || cl.state != stateReserved || !cl.end(r.life) {
		return
	}
	s := cl.s
	s.req.commit(cl.pos, true)
	s.seg.release()
	s.recycle(cl)
}

// Infer runs model on inputs and returns copies of its outputs: the convenience path,
// which copies inputs into the ring and outputs out of it. Use NewRequest to avoid the
// copies for large tensors.
//
// Infer owns its inputs until it returns, so it never fails for want of a session: while
// the Client reconnects, or when the session ends or drains before the request was sent,
// it waits for the next session and sends it there, as long as ctx allows. A request to
// an idempotent model whose session ended after it was sent (the daemon was killed or
// restarted) is made once more on the next session (WithIdempotentRetry). With
// WithRetry(true) it also makes again a request the daemon answered without running it
// and may run later (ErrShuttingDown, ErrOverloaded): see SafeToRetry and Retryable.
func (c *Client) Infer(ctx context.Context, model string, inputs ...Tensor) (Tensors, error) {
	if len(inputs) > maxTensors {
		return nil, notRun(fmt.Errorf("%w: model %s: %d inputs, the limit is %d per request", ErrBadRequest, strconv.Quote(model), len(inputs), maxTensors))
	}
	// On the stack, whatever the count: a heap slice would make the inputs' names and
	// shapes escape (see validate.go).
	// (Stores go to the array itself: escape analysis takes a store through a slice for
	// a store to the heap.)
	var buf [maxTensors]TensorSpec
	for i, t := range inputs {
		if err := t.checkData(); err != nil {
			return nil, notRun(badInputf("model %s: %v", strconv.Quote(model), err))
		}
		buf[i] = TensorSpec{Name: t.Name, DType: t.DType, Shape: t.Shape, NBytes: int64(len(t.Data))}
	}
	specs := buf[:len(inputs)]
	var b backoff
	replayed := false
	for {
		out, idempotent, err := c.infer(ctx, model, specs, inputs)
		if err == nil {
			return out, nil
		}
		if idempotent && !replayed && c.replay(ctx, err) {
			replayed = true // once: a request that kills the daemon must not do it forever
			continue
		}
		if !c.again(ctx, err, &b) {
			return out, err
		}
	}
}

// infer is one attempt of Infer. idempotent: the model said so when the request was made.
func (c *Client) infer(ctx context.Context, model string, specs []TensorSpec, inputs []Tensor) (Tensors, bool, error) {
	req, err := c.newRequest(ctx, model, specs)
	if err != nil {
		return nil, false, err
	}
	idempotent := false
	if m := c.models.get(model); m != nil {
		idempotent = m.Idempotent
	}
	for i, t := range inputs {
		copy(req.cl.inputs[i].Data, t.Data)
	}
	resp, err := req.Do(ctx)
	if err != nil {
		return nil, idempotent, err
	}
	out := make(Tensors, len(resp.Outputs))
	for i, t := range resp.Outputs {
		out[i] = t.cloneOne()
	}
	resp.Release()
	return out, idempotent, nil
}

// cloneOne is Clone in one allocation: shape and data share a block of 8-byte words
// (neither holds pointers), so the typed views work on the copy.
func (t Tensor) cloneOne() Tensor {
	rank := len(t.Shape)
	words := make([]uint64, rank+(len(t.Data)+7)/8)
	shape := unsafe.Slice((*int64)(unsafe.Pointer(unsafe.SliceData(words))), len(words))[:rank:rank]
	copy(shape, t.Shape)
	data := bytesOf(words[rank:])[:len(t.Data):len(t.Data)]
	copy(data, t.Data)
	return Tensor{Name: t.Name, DType: t.DType, Shape: shape, Data: data}
}

// newRequest reserves a record in this session. Nothing is sent, so every error it
// returns is safe to retry; one that the session's end caused says so (isGone), and the
// Client reserves again in the next session.
func (s *session) newRequest(ctx context.Context, model string, specs []TensorSpec) (Request, error) {
	req, err := s.reserveRequest(ctx, model, specs)
	if err != nil {
		return Request{}, &notRunError{err: err, gone: s.ended()}
	}
	return req, nil
}

func (s *session) reserveRequest(ctx context.Context, model string, specs []TensorSpec) (Request, error) {
	// Until the call holds its copy, errors quote model rather than keep it (see
	// validate.go).
	if err := ctx.Err(); err != nil {
		return Request{}, fmt.Errorf("shmclient: model %s: %w", strconv.Quote(model), err)
	}
	if s.ended() {
		return Request{}, s.Err()
	}
	if err := checkSpecs(model, specs, s.models.get(model)); err != nil {
		if s.models.get(model) == nil || !errors.Is(err, ErrBadInput) {
			return Request{}, err
		}
		// The cached signature may predate a reload: refresh it once before refusing.
		if _, rerr := s.listModels(ctx); rerr != nil {
			return Request{}, err
		}
		if err := checkSpecs(model, specs, s.models.get(model)); err != nil {
			return Request{}, err
		}
	}
	cl, err := s.getCall()
	if err != nil {
		return Request{}, err
	}
	life := cl.life.Load()
	fail := func(err error) (Request, error) {
		cl.end(life)
		s.recycle(cl)
		return Request{}, err
	}
	recLen, err := cl.plan(model, specs)
	if err != nil {
		return fail(err)
	}
	if capacity := s.req.r.capacity; recLen > capacity {
		return fail(fmt.Errorf("%w: model %q: the request record needs %d bytes but the request ring holds %d; Dial with WithRingSize(%d, 0) or larger",
			ErrTooLarge, cl.model, recLen, capacity, ringSizeFor(recLen)))
	}
	if !s.seg.acquire() {
		return fail(s.Err())
	}
	pos, err := s.reserve(ctx, cl.model, recLen)
	if err != nil {
		s.seg.release()
		return fail(err)
	}
	cl.pos, cl.rec = pos, s.req.slice(pos, recLen)
	cl.setInputs(specs)
	return Request{cl: cl, life: life}, nil
}

// reserve reserves n bytes of the request ring as the one writer (ringLock), waiting for
// space while ctx allows.
func (s *session) reserve(ctx context.Context, model string, n uint64) (uint64, error) {
	select {
	case s.ringLock <- struct{}{}:
	case <-ctx.Done():
		return 0, fmt.Errorf("shmclient: model %q: %w", model, ctx.Err())
	case <-s.done:
		return 0, s.Err()
	}
	defer func() { <-s.ringLock }()
	cw := ctxWait{ctx: ctx, s: s}
	defer cw.done()
	stop := func() (time.Duration, error) {
		if s.ended() {
			return 0, s.Err()
		}
		d, err := cw.check()
		if err != nil {
			return 0, fmt.Errorf("shmclient: model %q: waiting for request ring space: %w", model, err)
		}
		return d, nil
	}
	return s.req.reserve(n, stop)
}

// wakeWriter posts the eventfd a writer waiting for request-ring space sleeps on.
func (s *session) wakeWriter() {
	if s.seg.acquire() {
		s.req.space.post()
		s.seg.release()
	}
}

// ringSizeFor is the ring capacity to ask for so a record of n bytes fits.
func ringSizeFor(n uint64) uint64 {
	if n <= minRing {
		return minRing
	}
	return 1 << bits.Len64(n-1)
}
