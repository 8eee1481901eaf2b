// Package transport puts every way of reaching a model server behind one interface, so the
// load generator measures them all the same way.
package transport

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"
)

// Kinds of transport, as named on the command line and in the results.
const (
	ShmCopy     = "tensord-copy"     // shmclient Infer: copies inputs in and outputs out
	ShmZeroCopy = "tensord-zerocopy" // shmclient NewRequest/Do: fills the ring in place, reads outputs in place
	GRPC        = "grpc"             // gRPC over a Unix socket, raw tensor bytes (Triton-style)
	HTTPJSON    = "http-json"        // Flask under gunicorn, JSON lists of numbers
	Msgpack     = "msgpack-uds"      // msgpack frames over a Unix socket, tensor bytes inline
)

// Kinds lists every transport kind.
var Kinds = []string{ShmCopy, ShmZeroCopy, GRPC, HTTPJSON, Msgpack}

// Config says how to reach a server.
type Config struct {
	Kind string
	// Addr is a Unix socket path (tensord, grpc, msgpack) or host:port (http-json).
	Addr string
	// Spin is the shmclient spin budget (WithSpin); other transports ignore it.
	Spin time.Duration
	// MaxPayload and Callers size tensord's rings so every caller's request fits at once.
	MaxPayload  int
	Callers     int
	CallTimeout time.Duration
}

// Transport is a connection (or pool of them) to one server.
type Transport interface {
	// NewCaller returns a caller for one goroutine. Callers of one Transport share its
	// connection where the protocol multiplexes (tensord session, gRPC channel, HTTP
	// keep-alive pool) and get their own connection where it does not (msgpack).
	NewCaller() (Caller, error)
	Close() error
}

// Caller makes one round trip at a time.
type Caller interface {
	// Call sends p, waits for the outputs and checks them against p.
	Call(ctx context.Context, p *Payload) error
	Close() error
}

// Open connects a Transport of cfg.Kind.
func Open(ctx context.Context, cfg Config) (Transport, error) {
	if cfg.Callers < 1 {
		cfg.Callers = 1
	}
	switch cfg.Kind {
	case ShmCopy, ShmZeroCopy:
		return openShm(ctx, cfg)
	case GRPC:
		return openGRPC(ctx, cfg)
	case HTTPJSON:
		return openHTTP(ctx, cfg)
	case Msgpack:
		return openMsgpack(ctx, cfg)
	}
	return nil, fmt.Errorf("unknown transport %q (known: %s)", cfg.Kind, strings.Join(Kinds, ", "))
}

// Payload is one request: a float32 tensor "x" for model "identity" (shape [n]) or "mlp"
// (shape [n/16, 16]), the same bytes for every transport.
type Payload struct {
	Model  string
	Shape  []int64
	Data   []byte    // little-endian float32
	Floats []float32 // the same values, for the JSON transport
	// OutShape is the output shape the model must return.
	OutShape []int64
}

// NewPayload builds the request for model with size bytes of float32 input.
func NewPayload(model string, size int) (*Payload, error) {
	if size < 4 || size%4 != 0 {
		return nil, fmt.Errorf("payload of %d bytes: must be a positive multiple of 4", size)
	}
	n := size / 4
	p := &Payload{Model: model}
	switch model {
	case "identity":
		p.Shape = []int64{int64(n)}
		p.OutShape = p.Shape
	case "mlp":
		if n%16 != 0 {
			return nil, fmt.Errorf("mlp payload of %d bytes: must be a multiple of 64 (rows of 16 f32)", size)
		}
		p.Shape = []int64{int64(n / 16), 16}
		p.OutShape = []int64{int64(n / 16), 4}
	default:
		return nil, fmt.Errorf("unknown model %q (identity, mlp)", model)
	}
	p.Floats = make([]float32, n)
	p.Data = make([]byte, size)
	for i := range p.Floats {
		// Small multiples of 1/8 survive every encoding (JSON included) exactly.
		v := float32(i%4096-2048) / 8
		p.Floats[i] = v
		binary.LittleEndian.PutUint32(p.Data[4*i:], math.Float32bits(v))
	}
	return p, nil
}

// Size is the input's size in bytes.
func (p *Payload) Size() int { return len(p.Data) }

// CheckShape compares an output shape with the expected one.
func (p *Payload) CheckShape(shape []int64) error {
	if len(shape) != len(p.OutShape) {
		return fmt.Errorf("output shape %v, want %v", shape, p.OutShape)
	}
	for i := range shape {
		if shape[i] != p.OutShape[i] {
			return fmt.Errorf("output shape %v, want %v", shape, p.OutShape)
		}
	}
	return nil
}

// CheckBytes checks output bytes: their length, and for identity a few probes (first,
// middle, last element) against the input, which catches a stale or misplaced buffer
// without turning the check into a second full pass over the data.
func (p *Payload) CheckBytes(shape []int64, data []byte) error {
	if err := p.CheckShape(shape); err != nil {
		return err
	}
	want := 4
	for _, d := range p.OutShape {
		want *= int(d)
	}
	if len(data) != want {
		return fmt.Errorf("output of %d bytes, want %d", len(data), want)
	}
	if p.Model == "identity" {
		for _, i := range probes(len(data) / 4) {
			if string(data[4*i:4*i+4]) != string(p.Data[4*i:4*i+4]) {
				return fmt.Errorf("output element %d differs from the input", i)
			}
		}
	}
	return nil
}

// CheckFloats is CheckBytes for decoded numbers.
func (p *Payload) CheckFloats(shape []int64, data []float32) error {
	if err := p.CheckShape(shape); err != nil {
		return err
	}
	want := 1
	for _, d := range p.OutShape {
		want *= int(d)
	}
	if len(data) != want {
		return fmt.Errorf("output of %d elements, want %d", len(data), want)
	}
	if p.Model == "identity" {
		for _, i := range probes(len(data)) {
			if data[i] != p.Floats[i] {
				return fmt.Errorf("output element %d is %v, want %v", i, data[i], p.Floats[i])
			}
		}
	}
	return nil
}

func probes(n int) []int {
	if n == 0 {
		return nil
	}
	s := []int{0, n / 2, n - 1}
	sort.Ints(s)
	return s
}
