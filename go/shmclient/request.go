package shmclient

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/bits"
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

// Release gives the outputs' ring space back to the daemon. The Outputs must not be used
// afterwards. Calling it again is a no-op.
func (r *Response) Release() {
	if r == nil || !r.released.CompareAndSwap(false, true) {
		return
	}
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
// shared memory, valid until Send/Do or Abandon.
func (r *Request) Input(i int) Tensor { return r.inputs[i] }

// NumInputs returns the number of inputs.
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
	ch := make(chan reqResult, 1)
	c.mu.Lock()
	if c.closeErr != nil {
		err := c.closeErr
		c.mu.Unlock()
		r.Abandon()
		return err
	}
	c.pendingReq[r.id] = ch
	c.mu.Unlock()

	// Descriptor last, so timeout_us is measured as late as possible. The layout left
	// room for the longest timeout encoding, so the offsets stay valid.
	r.desc.TimeoutUS = timeoutUS
	desc, err := marshal(nil, &r.desc)
	if err == nil && recordHeaderSize+len(desc) > int(r.dataStart) {
		err = fmt.Errorf("shmclient: internal error: descriptor outgrew its reserved room")
	}
	if err != nil {
		c.mu.Lock()
		delete(c.pendingReq, r.id)
		c.mu.Unlock()
		r.Abandon()
		return err
	}
	copy(r.rec[recordHeaderSize:], desc)
	putRecordHeader(r.rec, recordHeader{Len: uint32(len(r.rec)), Kind: kindRequest, RequestID: r.id, DescLen: uint32(len(desc))})
	r.state = statePublished
	r.result = ch
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
	select {
	case res := <-ch:
		return c.finish(r.model, res)
	case <-ctx.Done():
		c.mu.Lock()
		_, pending := c.pendingReq[r.id]
		delete(c.pendingReq, r.id)
		c.mu.Unlock()
		if !pending {
			// The reader already took it off the map: the result is (being) delivered.
			if res := <-ch; res.resp != nil {
				res.resp.Release()
			}
		}
		// Otherwise the reader finds no waiter and releases the response on arrival.
		return nil, fmt.Errorf("shmclient: model %q: %w", r.model, ctx.Err())
	}
}

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
	for i, s := range specs {
		ref := desc.Inputs[i]
		shape := make([]int64, len(s.Shape))
		copy(shape, s.Shape)
		r.inputs[i] = Tensor{Name: s.Name, DType: s.DType, Shape: shape,
			Data: r.rec[ref.Offset : ref.Offset+ref.NBytes : ref.Offset+ref.NBytes]}
	}
	return r, nil
}

// planRecord lays a request record out: descriptor, then each tensor at a 64-byte
// aligned offset. The offsets are inside the descriptor, so its length depends on them;
// iterate to a fixed point (offsets only grow, so this converges in a step or two). The
// descriptor is sized with the longest timeout_us encoding so the real timeout, known
// only at Do, always fits.
func planRecord(model string, specs []TensorSpec) (desc requestDesc, dataStart, recLen uint64, err error) {
	desc = requestDesc{Model: model, TimeoutUS: math.MaxUint64, Inputs: make([]tensorRef, len(specs))}
	for i, s := range specs {
		shape := make([]uint64, len(s.Shape))
		for j, d := range s.Shape {
			shape[j] = uint64(d)
		}
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
		enc, err := marshal(nil, &desc)
		if err != nil {
			return desc, 0, 0, err
		}
		if len(enc) > maxDescriptor {
			return desc, 0, 0, fmt.Errorf("%w: model %q: descriptor of %d bytes exceeds the %d byte limit", ErrBadRequest, model, len(enc), maxDescriptor)
		}
		need := align64(recordHeaderSize + uint64(len(enc)))
		if need <= start {
			return desc, start, end, nil
		}
		start = need
	}
}

// ringSizeFor is the ring capacity to ask for so a record of n bytes fits.
func ringSizeFor(n uint64) uint64 {
	if n <= minRing {
		return minRing
	}
	return 1 << bits.Len64(n-1)
}
