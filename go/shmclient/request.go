package shmclient

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
)

// Request is a request record reserved in the request ring (the zero-copy path). Fill
// the inputs in place through Input(i), then call Do (or Send and Wait), or Abandon.
// Until then, later requests of the same Client cannot be published (the ring publishes
// in order, SPEC §4.7), so fill promptly; a Request that is dropped without either
// stalls the Client. A Request is for use by one goroutine.
type Request struct {
	c         *Client
	model     string
	id        uint64
	pos       uint64
	rec       []byte
	desc      requestDesc
	dataStart uint64 // where tensor data starts; the descriptor must end before it
	inputs    []Tensor
	state     int
	result    chan reqResult // set by Send, consumed by Wait
}

const (
	stateReserved = iota
	statePublished
	stateAbandoned
)

// Response holds a request's outputs as views into the response ring. They are valid
// until Release, which frees the ring space; release every Response, or the daemon runs
// out of room for responses and stalls.
type Response struct {
	Outputs []Tensor

	c        *Client
	seq      uint64
	released atomic.Bool
}

// Output returns the output called name, or false.
func (r *Response) Output(name string) (Tensor, bool) {
	for _, t := range r.Outputs {
		if t.Name == name {
			return t, true
		}
	}
	return Tensor{}, false
}

// Release gives the outputs' ring space back to the daemon, where the next responses
// are written. It empties Outputs, so that a use after Release finds nothing instead of
// another request's bytes; copies of the Tensors taken before must not be used either.
// Calling it again is a no-op.
func (r *Response) Release() {
	if r == nil || !r.released.CompareAndSwap(false, true) {
		return
	}
	r.Outputs = nil
	r.c.resp.release(r.seq)
	r.c.seg.release()
}

// NewRequest reserves a record for model with inputs of the given specs and returns it
// with each input's Data pointing into shared memory, to be filled in place (the memory
// holds stale bytes until then). It validates the specs like Infer and waits for ring
// space as long as ctx allows.
func (c *Client) NewRequest(ctx context.Context, model string, specs ...TensorSpec) (*Request, error) {
	return c.newRequest(ctx, model, specs)
}

// Input returns input i (in the order given to NewRequest); its Data is the record's
// shared memory, valid until Send/Do or Abandon. After those Input panics: the memory
// then belongs to the daemon, or to a later request.
func (r *Request) Input(i int) Tensor {
	if r.inputs == nil {
		panic("shmclient: Request.Input called after Send, Do or Abandon")
	}
	return r.inputs[i]
}

// NumInputs returns the number of inputs, 0 after Send, Do or Abandon.
func (r *Request) NumInputs() int { return len(r.inputs) }

// Do publishes the request and waits for its response: Send, then Wait.
func (r *Request) Do(ctx context.Context) (*Response, error) {
	if err := r.Send(ctx); err != nil {
		return nil, err
	}
	return r.Wait(ctx)
}

// Send publishes the request without waiting, so a goroutine can have several requests
// in flight; every Send must be followed by Wait, which also frees the response. ctx's
// deadline becomes the request's time budget in the daemon. After Send the inputs
// belong to the daemon and must not be touched.
func (r *Request) Send(ctx context.Context) error {
	if r.state != stateReserved {
		return fmt.Errorf("shmclient: Request.Send called after Send or Abandon")
	}
	c := r.c
	var timeoutUS uint64
	if dl, ok := ctx.Deadline(); ok {
		d := time.Until(dl)
		if d <= 0 {
			r.Abandon()
			return fmt.Errorf("shmclient: model %q: %w", r.model, context.DeadlineExceeded)
		}
		timeoutUS = uint64((d + time.Microsecond - 1) / time.Microsecond)
	}
	if err := ctx.Err(); err != nil {
		r.Abandon()
		return fmt.Errorf("shmclient: model %q: %w", r.model, err)
	}

	// The descriptor is encoded once, straight into the record, now that timeout_us is
	// known. The layout left room for the longest timeout encoding, so the offsets stay
	// valid; the length check catches requestDescLen and appendRequestDesc disagreeing
	// (a bug) before it could publish a torn record.
	r.desc.TimeoutUS = timeoutUS
	room := r.rec[recordHeaderSize:recordHeaderSize:r.dataStart]
	n := requestDescLen(&r.desc)
	if n > cap(room) || len(appendRequestDesc(room, &r.desc)) != n {
		r.Abandon()
		return fmt.Errorf("shmclient: internal error: descriptor of %d bytes does not fit its reserved %d", n, cap(room))
	}
	putRecordHeader(r.rec, recordHeader{Len: uint32(len(r.rec)), Kind: kindRequest, RequestID: r.id, DescLen: uint32(n)})

	ch := resultChans.Get().(chan reqResult)
	c.mu.Lock()
	if c.closeErr != nil {
		err := c.closeErr
		c.mu.Unlock()
		resultChans.Put(ch)
		r.Abandon()
		return err
	}
	c.pendingReq[r.id] = ch
	c.inFlight++
	c.mu.Unlock()
	r.state = statePublished
	r.result = ch
	r.inputs, r.rec = nil, nil
	c.req.commit(r.pos, false)
	c.seg.release() // the record is the daemon's now; our input views are dead
	return nil
}

// Wait waits for the response of a sent request. If ctx ends first, Wait returns ctx's
// error at once; the response, when it comes, is released by the client.
func (r *Request) Wait(ctx context.Context) (*Response, error) {
	if r.state != statePublished || r.result == nil {
		return nil, fmt.Errorf("shmclient: Request.Wait called without Send, or twice")
	}
	c, ch := r.c, r.result
	r.result = nil
	c.enterWait()
	defer c.leaveWait()
	// Read the response ring ourselves when nobody else is (reader.go); otherwise
	// whoever is delivers on ch.
	select {
	case res := <-ch:
		resultChans.Put(ch)
		return c.finish(r.model, res)
	case c.readerTok <- struct{}{}:
		// The previous reader may have delivered ours just before handing over (select
		// picks among ready cases at random). Nobody else reads while we hold the
		// token, so if ch is empty now, the response is still to come.
		var res reqResult
		ok := true
		select {
		case res = <-ch:
		default:
			res, ok = c.readFor(ctx, r.id)
		}
		<-c.readerTok
		if ok {
			resultChans.Put(ch)
			return c.finish(r.model, res)
		}
		// Only the end of ctx or of the session stops a reader short; the latter's
		// error comes on ch.
		select {
		case res := <-ch:
			resultChans.Put(ch)
			return c.finish(r.model, res)
		case <-ctx.Done():
		}
	case <-ctx.Done():
	}
	c.mu.Lock()
	_, pending := c.pendingReq[r.id]
	delete(c.pendingReq, r.id)
	c.mu.Unlock()
	if !pending {
		// A reader already took it off the map: the result is (being) delivered.
		if res := <-ch; res.resp != nil {
			res.resp.Release()
		}
	}
	// Otherwise whoever reads it finds no waiter and releases the response on arrival
	// (readResponses, kicked as this Wait returns, if no other Wait is reading). Either
	// way nothing more will be sent on ch.
	resultChans.Put(ch)
	return nil, fmt.Errorf("shmclient: model %q: %w", r.model, ctx.Err())
}

// resultChans recycles the per-request result channels. A channel is sent on at most
// once, by whoever takes it off pendingReq (dispatch or shutdown), and Wait returns it
// only once that send was received or can no longer happen, so a recycled channel is
// always empty and unreachable from the map.
var resultChans = sync.Pool{New: func() any { return make(chan reqResult, 1) }}

func (c *Client) finish(model string, res reqResult) (*Response, error) {
	if res.err != nil {
		if errors.Is(res.err, ErrUnknownModel) {
			c.forgetModel(model)
		}
		return nil, res.err
	}
	return res.resp, nil
}

// Abandon gives the reservation up: it becomes a PAD record the daemon skips. It is a
// no-op after Send (or Do) or a previous Abandon.
func (r *Request) Abandon() {
	if r.state != stateReserved {
		return
	}
	r.state = stateAbandoned
	r.inputs, r.rec = nil, nil
	r.c.req.commit(r.pos, true)
	r.c.seg.release()
}

// Infer runs model on inputs and returns copies of its outputs: the convenience path,
// which copies inputs into the ring and outputs out of it. Use NewRequest to avoid the
// copies for large tensors.
func (c *Client) Infer(ctx context.Context, model string, inputs ...Tensor) ([]Tensor, error) {
	specs := make([]TensorSpec, len(inputs))
	for i, t := range inputs {
		if err := t.checkData(); err != nil {
			return nil, badInputf("model %q: %v", model, err)
		}
		specs[i] = TensorSpec{Name: t.Name, DType: t.DType, Shape: t.Shape, NBytes: int64(len(t.Data))}
	}
	req, err := c.newRequest(ctx, model, specs)
	if err != nil {
		return nil, err
	}
	for i, t := range inputs {
		copy(req.inputs[i].Data, t.Data)
	}
	resp, err := req.Do(ctx)
	if err != nil {
		return nil, err
	}
	defer resp.Release()
	out := make([]Tensor, len(resp.Outputs))
	for i, t := range resp.Outputs {
		out[i] = t.Clone()
	}
	return out, nil
}

func (c *Client) newRequest(ctx context.Context, model string, specs []TensorSpec) (*Request, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("shmclient: model %q: %w", model, err)
	}
	if err := c.Err(); err != nil {
		return nil, err
	}
	if err := checkSpecs(model, specs, c.modelInfo(model)); err != nil {
		if c.modelInfo(model) == nil || !errors.Is(err, ErrBadInput) {
			return nil, err
		}
		// The cached signature may predate a reload: refresh it once before refusing.
		if _, rerr := c.Models(ctx); rerr != nil {
			return nil, err
		}
		if err := checkSpecs(model, specs, c.modelInfo(model)); err != nil {
			return nil, err
		}
	}
	desc, dataStart, recLen, err := planRecord(model, specs)
	if err != nil {
		return nil, err
	}
	if capacity := c.req.r.capacity; recLen > capacity {
		return nil, fmt.Errorf("%w: model %q: the request record needs %d bytes but the request ring holds %d; Dial with WithRingSize(%d, 0) or larger",
			ErrTooLarge, model, recLen, capacity, ringSizeFor(recLen))
	}
	if !c.seg.acquire() {
		return nil, c.Err()
	}
	stop := func() (time.Duration, error) {
		select {
		case <-c.done:
			return 0, c.Err()
		default:
		}
		if err := ctx.Err(); err != nil {
			return 0, fmt.Errorf("shmclient: model %q: waiting for request ring space: %w", model, err)
		}
		if dl, ok := ctx.Deadline(); ok {
			d := time.Until(dl)
			if d <= 0 {
				return 0, fmt.Errorf("shmclient: model %q: waiting for request ring space: %w", model, context.DeadlineExceeded)
			}
			return d, nil
		}
		return 0, nil
	}
	select {
	case c.ringLock <- struct{}{}:
	case <-ctx.Done():
		c.seg.release()
		return nil, fmt.Errorf("shmclient: model %q: %w", model, ctx.Err())
	case <-c.done:
		c.seg.release()
		return nil, c.Err()
	}
	pos, err := c.req.reserve(recLen, stop)
	<-c.ringLock
	if err != nil {
		c.seg.release()
		return nil, err
	}
	r := &Request{c: c, model: model, id: c.nextID.Add(1), pos: pos, rec: c.req.slice(pos, recLen), desc: desc, dataStart: dataStart}
	r.inputs = make([]Tensor, len(specs))
	dims := make([]int64, 0, totalRank(specs)) // one allocation for every input's shape
	for i, s := range specs {
		ref := desc.Inputs[i]
		// Full slice expressions: an append to one shape must not run into the next.
		dims = append(dims, s.Shape...)
		shape := dims[len(dims)-len(s.Shape) : len(dims) : len(dims)]
		r.inputs[i] = Tensor{Name: s.Name, DType: s.DType, Shape: shape,
			Data: r.rec[ref.Offset : ref.Offset+ref.NBytes : ref.Offset+ref.NBytes]}
	}
	return r, nil
}

// planRecord lays a request record out: descriptor, then each tensor at a 64-byte
// aligned offset. The offsets are inside the descriptor, so its length depends on them;
// iterate to a fixed point (offsets only grow, so this converges in a step or two). The
// descriptor is sized with the longest timeout_us encoding so the real timeout, known
// only at Send, always fits. Sizing is arithmetic (requestDescLen): the descriptor is
// encoded once, by Send.
func planRecord(model string, specs []TensorSpec) (desc requestDesc, dataStart, recLen uint64, err error) {
	desc = requestDesc{Model: model, TimeoutUS: math.MaxUint64, Inputs: make([]tensorRef, len(specs))}
	dims := make([]uint64, 0, totalRank(specs)) // one allocation for every input's shape
	for i, s := range specs {
		for _, d := range s.Shape {
			dims = append(dims, uint64(d))
		}
		shape := dims[len(dims)-len(s.Shape) : len(dims) : len(dims)]
		desc.Inputs[i] = tensorRef{Name: s.Name, DType: s.DType.String(), Shape: shape, NBytes: specNBytes(s)}
	}
	start := align64(recordHeaderSize)
	for {
		end := start
		for i := range desc.Inputs {
			desc.Inputs[i].Offset = end
			if desc.Inputs[i].NBytes > math.MaxUint32 {
				return desc, 0, 0, fmt.Errorf("%w: model %q: input %q of %d bytes exceeds any ring", ErrTooLarge, model, desc.Inputs[i].Name, desc.Inputs[i].NBytes)
			}
			end = align64(end + desc.Inputs[i].NBytes)
		}
		n := requestDescLen(&desc)
		if n > maxDescriptor {
			return desc, 0, 0, fmt.Errorf("%w: model %q: descriptor of %d bytes exceeds the %d byte limit", ErrBadRequest, model, n, maxDescriptor)
		}
		need := align64(recordHeaderSize + uint64(n))
		if need <= start {
			return desc, start, end, nil
		}
		start = need
	}
}

func totalRank(specs []TensorSpec) int {
	n := 0
	for _, s := range specs {
		n += len(s.Shape)
	}
	return n
}

// ringSizeFor is the ring capacity to ask for so a record of n bytes fits.
func ringSizeFor(n uint64) uint64 {
	if n <= minRing {
		return minRing
	}
	return 1 << bits.Len64(n-1)
}
