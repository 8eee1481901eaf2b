package shmclient

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// SPEC §7: at most 64 inputs or outputs per request.

func manyInputs(n int) []Tensor {
	in := make([]Tensor, n)
	for i := range in {
		in[i] = FromFloat32(fmt.Sprint("x", i), []int64{1}, []float32{1})
	}
	return in
}

func TestTooManyInputsRefused(t *testing.T) {
	// A client whose session is over and that does not reconnect: the request must be
	// refused before anything touches the (absent) rings or socket.
	s := &session{done: make(chan struct{})}
	close(s.done)
	c := &Client{done: make(chan struct{})}
	c.cur.Store(s)
	_, err := c.Infer(context.Background(), "m", manyInputs(maxTensors+1)...)
	if !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), "65 inputs") {
		t.Fatalf("Infer with %d inputs: %v, want ErrBadRequest naming the count", maxTensors+1, err)
	}
	specs := make([]TensorSpec, maxTensors+1)
	for i := range specs {
		specs[i] = TensorSpec{Name: fmt.Sprint("x", i), DType: U8, Shape: []int64{1}}
	}
	if _, err := c.NewRequest(context.Background(), "m", specs...); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("NewRequest with %d inputs: %v, want ErrBadRequest", len(specs), err)
	}
	if err := checkSpecs("m", specs[:maxTensors], nil); err != nil {
		t.Fatalf("%d inputs are allowed: %v", maxTensors, err)
	}
}

// TestTooManyInputsThroughDaemon: the limit holds with a live session too, and the
// session goes on.
func TestTooManyInputsThroughDaemon(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	var derr *DaemonError
	_, err := c.Infer(ctx, "identity", manyInputs(maxTensors+1)...)
	if !errors.Is(err, ErrBadRequest) || errors.As(err, &derr) {
		t.Fatalf("got %v, want the client's own ErrBadRequest", err)
	}
	if tail := *c.sess().req.r.tail; tail != 0 {
		t.Fatalf("request ring tail %d: something was written", tail)
	}
	if _, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{1}, []float32{1})); err != nil {
		t.Fatal(err)
	}
}

func outputsDesc(t *testing.T, n int) []byte {
	t.Helper()
	d := responseDesc{Outputs: make([]tensorRef, n)}
	for i := range d.Outputs {
		d.Outputs[i] = tensorRef{Name: fmt.Sprint("y", i), DType: "u8", Shape: []uint64{0}, Offset: 64 * 64, NBytes: 0}
	}
	b, err := marshal(nil, &d)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestTooManyOutputsRefused(t *testing.T) {
	if d, err := decodeResponseDesc(outputsDesc(t, maxTensors)); err != nil || len(d.Outputs) != maxTensors {
		t.Fatalf("%d outputs: %v", maxTensors, err)
	}
	b := outputsDesc(t, maxTensors+1)
	if _, err := decodeResponseDesc(b); err == nil {
		t.Fatalf("decodeResponseDesc took %d outputs", maxTensors+1)
	}
	checkSameDecode(t, b)

	// As a response record: a protocol error for that request (SPEC §4.8's rule, applied
	// to the daemon), before any view of the record is made.
	rec := make([]byte, align64(recordHeaderSize+uint64(len(b))))
	putRecordHeader(rec, recordHeader{Len: uint32(len(rec)), Kind: kindResponse, RequestID: 7, DescLen: uint32(len(b))})
	copy(rec[recordHeaderSize:], b)
	cl := &call{}
	err := (&session{}).parseOutputs(cl, record{hdr: getRecordHeader(rec), body: rec})
	if !errors.Is(err, ErrProtocol) || len(cl.outputs) != 0 {
		t.Fatalf("response with %d outputs: %v, %v; want ErrProtocol", maxTensors+1, cl.outputs, err)
	}
}
