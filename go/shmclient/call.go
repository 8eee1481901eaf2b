package shmclient

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync/atomic"
)

// call is the state of one request, from NewRequest to its end: Abandon, a failed Send or
// Wait, or Response.Release. A Client recycles its calls, with every buffer in them
// (descriptor, input and output tensors, shapes, the result channel), so that a request
// on the zero-copy path allocates nothing once a call of its shape has been made.
//
// Recycling is what makes the Request and Response handles values: a handle names a call
// and the lifetime (life) it was made in, and every method checks that the call is still
// in that lifetime. A handle kept past the end of its request is refused (or, for
// Release and Abandon, ignored) instead of acting on whatever later request reuses the
// call.
//
// The request id is the call's slot in Client.calls (low 32 bits) and its lifetime (high
// 32 bits): a response finds its call without a map, and a late response to a request
// whose caller gave up finds the slot reused under another id and is released unread.
type call struct {
	s    *session
	slot uint32
	life atomic.Uint64 // starts at 1; bumped once when the request ends
	// ch carries the verdict on the response (nil: parsed into the call) from whoever
	// takes the call off pending (a reader, or shutdown) to the waiter. Exactly one
	// send follows each take, and the call is only recycled once that send has been
	// received or can no longer happen, so a recycled call's channel is empty.
	ch chan error

	// Set up by newRequest, then owned by the request's goroutine.
	id        uint64
	model     string
	state     callState
	pos       uint64 // the reservation in the request ring
	rec       []byte
	desc      requestDesc
	udims     []uint64 // backing array of desc's shapes
	dataStart uint64
	inputs    []Tensor
	dims      []int64 // backing array of inputs' shapes

	pending bool // guarded by Client.mu: published, its response not yet taken

	// The response: written by the reader that takes the call, then the waiter's.
	seq     uint64 // the response record, held in the response ring until Release
	refs    []tensorRef
	rdims   []uint64
	outputs []Tensor
	odims   []int64
}

type callState uint8

const (
	stateReserved callState = iota // inputs may be filled
	stateSent                      // published, Wait not called yet
	stateWaiting                   // in Wait
	stateAnswered                  // Wait returned a Response
)

// getCall takes a call off the free list (or makes one) for a new request.
func (s *session) getCall() (*call, error) {
	s.mu.Lock()
	if s.closeErr != nil {
		err := s.closeErr
		s.mu.Unlock()
		return nil, err
	}
	var cl *call
	if n := len(s.free); n > 0 {
		cl = s.free[n-1]
		s.free[n-1] = nil
		s.free = s.free[:n-1]
	} else {
		if len(s.calls) == math.MaxUint32 {
			s.mu.Unlock()
			return nil, fmt.Errorf("%w: %d requests in flight", ErrOverloaded, len(s.calls))
		}
		cl = &call{s: s, slot: uint32(len(s.calls)), ch: make(chan error, 1)}
		cl.life.Store(1)
		s.calls = append(s.calls, cl)
	}
	s.mu.Unlock()
	cl.id = uint64(uint32(cl.life.Load()))<<32 | uint64(cl.slot)
	cl.state = stateReserved
	return cl, nil
}

// end ends the call's lifetime life, once: it reports whether this caller did (and must
// then recycle it), false when the handle was stale or someone ended it already.
func (cl *call) end(life uint64) bool { return cl.life.CompareAndSwap(life, life+1) }

// recycle puts an ended call back on the free list. Its buffers keep their capacity;
// views handed out in its previous lifetimes are dead (the documentation says so).
func (s *session) recycle(cl *call) {
	cl.rec = nil // model stays, for reuseString
	cl.inputs, cl.outputs = cl.inputs[:0], cl.outputs[:0]
	s.mu.Lock()
	s.free = append(s.free, cl)
	s.mu.Unlock()
}

// take hands the call waiting for response id to the reader that read it, or returns nil
// when there is none: its caller gave up, or the session is ending (shutdown takes every
// pending call). Whoever takes a call sends on its channel, unless it is the waiter.
func (s *session) take(id uint64) *call {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inFlight > 0 {
		s.inFlight--
		s.checkIdleLocked()
	}
	slot := id & math.MaxUint32
	if slot >= uint64(len(s.calls)) {
		return nil
	}
	cl := s.calls[slot]
	if !cl.pending || cl.id != id {
		return nil
	}
	cl.pending = false
	return cl
}

// plan lays the request record out into the call's buffers (see planRecord) and returns
// its length. The call keeps copies of the model's and the inputs' names, made only when
// they differ from the last request's (reuseString): storing the caller's strings would
// make escape analysis move every caller's names and shapes to the heap.
func (cl *call) plan(model string, specs []TensorSpec) (uint64, error) {
	var err error
	var recLen uint64
	cl.model = reuseString(cl.model, model)
	cl.desc.Model = cl.model
	cl.desc.Inputs, cl.udims, cl.dataStart, recLen, err = planRecordInto(cl.desc.Inputs[:0], cl.udims[:0], cl.model, specs)
	return recLen, err
}

// reuseString returns old if it equals s, else a copy of s, which does not escape.
func reuseString(old, s string) string {
	if old == s {
		return old
	}
	return strings.Clone(s)
}

// setInputs points the call's input tensors at the reserved record.
func (cl *call) setInputs(specs []TensorSpec) {
	if cl.dims == nil {
		cl.dims = make([]int64, 0, 8)
	}
	inputs, dims := cl.inputs[:0], cl.dims[:0]
	for i, s := range specs {
		ref := &cl.desc.Inputs[i]
		start := len(dims)
		dims = append(dims, s.Shape...)
		// Full slice expressions: an append to one shape must not run into the next.
		shape := dims[start:len(dims):len(dims)]
		inputs = append(inputs, Tensor{Name: ref.Name, DType: s.DType, Shape: shape,
			Data: cl.rec[ref.Offset : ref.Offset+ref.NBytes : ref.Offset+ref.NBytes]})
	}
	cl.inputs, cl.dims = inputs, dims
}

// planRecord lays a request record out (see planRecordInto) in new buffers.
func planRecord(model string, specs []TensorSpec) (desc requestDesc, dataStart, recLen uint64, err error) {
	desc.Model = model
	desc.Inputs, _, dataStart, recLen, err = planRecordInto(nil, nil, model, specs)
	desc.TimeoutUS = math.MaxUint64
	desc.Priority = uint64(PriorityHigh) // sized for the longest descriptor, like the timeout
	return desc, dataStart, recLen, err
}

// planRecordInto lays a request record out: descriptor, then each tensor at a 64-byte
// aligned offset. It fills refs (reusing its capacity, and udims' for their shapes) and
// returns where tensor data starts and the record's length. The offsets are inside the
// descriptor, so its length depends on them; iterate to a fixed point (offsets only grow,
// so this converges in a step or two). The descriptor is sized with the longest
// timeout_us encoding so the real timeout, known only at Send, always fits. Sizing is
// arithmetic (requestDescLen): the descriptor is encoded once, by Send.
func planRecordInto(refs []tensorRef, udims []uint64, model string, specs []TensorSpec) (_ []tensorRef, _ []uint64, dataStart, recLen uint64, err error) {
	if udims == nil {
		udims = make([]uint64, 0, 8)
	}
	for i, s := range specs {
		start := len(udims)
		for _, d := range s.Shape {
			udims = append(udims, uint64(d))
		}
		var name string // the name a previous request left in refs' backing array, or a copy
		if i < cap(refs) {
			name = reuseString(refs[:cap(refs)][i].Name, s.Name)
		} else {
			name = strings.Clone(s.Name)
		}
		refs = append(refs, tensorRef{Name: name, DType: s.DType.String(),
			Shape: udims[start:len(udims):len(udims)], NBytes: specNBytes(s)})
	}
	// Sized with the longest timeout and a priority: both are known only at Send.
	desc := requestDesc{Model: model, TimeoutUS: math.MaxUint64, Inputs: refs, Priority: uint64(PriorityHigh)}
	start := align64(recordHeaderSize)
	for {
		end := start
		for i := range refs {
			refs[i].Offset = end
			if refs[i].NBytes > math.MaxUint32 {
				return refs, udims, 0, 0, fmt.Errorf("%w: model %s: input %q of %d bytes exceeds any ring", ErrTooLarge, strconv.Quote(model), refs[i].Name, refs[i].NBytes)
			}
			end = align64(end + refs[i].NBytes)
		}
		n := requestDescLen(&desc)
		if n > maxDescriptor {
			return refs, udims, 0, 0, fmt.Errorf("%w: model %s: descriptor of %d bytes exceeds the %d byte limit", ErrBadRequest, strconv.Quote(model), n, maxDescriptor)
		}
		need := align64(recordHeaderSize + uint64(n))
		if need <= start {
			return refs, udims, start, end, nil
		}
		start = need
	}
}
