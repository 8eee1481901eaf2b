// Package transport puts every way of reaching a model server behind one interface, so the
// load generator measures them all the same way.
package transport

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

// Kinds of transport, as named on the command line and in the results.
const (
	ShmCopy     = "tensord-copy"     // shmclient Infer: copies inputs in and outputs out
	ShmZeroCopy = "tensord-zerocopy" // shmclient NewRequest/Do: fills the ring in place, reads outputs in place
	GRPC        = "grpc"             // gRPC over a Unix socket, raw tensor bytes (Triton-style)
	HTTPJSON    = "http-json"        // Flask under gunicorn, JSON lists of numbers
	Msgpack     = "msgpack-uds"      // msgpack frames over a Unix socket, tensor bytes inline
	// tensord-gateway (go/cmd/tensord-gateway) in front of a tensord daemon: the Open
	// Inference Protocol (KServe v2).
	GwHTTPJSON   = "gw-http-json"   // HTTP/REST, JSON numbers
	GwHTTPBinary = "gw-http-binary" // HTTP/REST, Triton's binary tensor extension
	GwGRPC       = "gw-grpc"        // KServe v2 gRPC, raw_input_contents / raw_output_contents
)

// Kinds lists every transport kind.
var Kinds = []string{ShmCopy, ShmZeroCopy, GRPC, HTTPJSON, Msgpack, GwHTTPJSON, GwHTTPBinary, GwGRPC}

// Config says how to reach a server.
type Config struct {
	Kind string
	// Addr is a Unix socket path (tensord, grpc, msgpack, gw-grpc) or host:port (http-json,
	// gw-http-*).
	Addr string
	// Spin is the shmclient spin budget (WithSpin); other transports ignore it.
	Spin time.Duration
	// MaxPayload and Callers size tensord's rings so every caller's request fits at once.
	MaxPayload  int
	Callers     int
	CallTimeout time.Duration
	// Priority 1 sends tensord requests at shmclient.PriorityHigh; others ignore it.
	Priority int
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
	case GwHTTPJSON, GwHTTPBinary:
		return openGwHTTP(ctx, cfg)
	case GwGRPC:
		return openGwGRPC(ctx, cfg)
	}
	return nil, fmt.Errorf("unknown transport %q (known: %s)", cfg.Kind, strings.Join(Kinds, ", "))
}

// Payload kinds: what a request carries.
const (
	KindIdentity = "identity" // f32 [n] "x" -> "y", the same values back
	KindMLP      = "mlp"      // f32 [n/16, 16] "x" -> f32 [n/16, 4]
	KindImage    = "image"    // bytes [1] "image" (one encoded image file) -> vision.classify's 3 outputs [1, 5]
)

// Payload is one request: a float32 tensor "x" for a model of kind "identity" (shape [n])
// or "mlp" (shape [n/16, 16]), the same bytes for every transport; or, kind "image", one
// encoded image as a bytes tensor "image" [1] (tensord transports only).
type Payload struct {
	Model  string // the model's name in the server
	Kind   string // identity, mlp or image
	Input  string // the input tensor's name
	Bytes  bool   // a bytes tensor (SPEC §5 layout in Data) rather than f32
	Shape  []int64
	Data   []byte    // little-endian float32, or the bytes layout
	Floats []float32 // the same values, for the JSON transports
	// OutShape is the output shape the model must return (every output's, for images);
	// NOut the number of outputs.
	OutShape []int64
	NOut     int
}

// NewPayload builds the request for model (identity or mlp, also its kind) with size bytes
// of float32 input.
func NewPayload(model string, size int) (*Payload, error) {
	return NewPayloadKind(model, model, size, "")
}

// NewPayloadKind builds the request for the model named model, of kind (identity, mlp,
// image; "" = the model's name): size bytes of float32 input, or the image file's bytes.
func NewPayloadKind(kind, model string, size int, image string) (*Payload, error) {
	if kind == "" {
		kind = model
	}
	p := &Payload{Model: model, Kind: kind, Input: "x", NOut: 1}
	if kind == KindImage {
		img, err := os.ReadFile(image)
		if err != nil {
			return nil, fmt.Errorf("image payload: %w", err)
		}
		t := shmclient.FromBytes("image", []int64{1}, [][]byte{img})
		p.Input, p.Bytes, p.Shape, p.Data = "image", true, t.Shape, t.Data
		p.OutShape, p.NOut = []int64{1, 5}, 3 // labels, scores, classes: the top 5
		return p, nil
	}
	if size < 4 || size%4 != 0 {
		return nil, fmt.Errorf("payload of %d bytes: must be a positive multiple of 4", size)
	}
	n := size / 4
	switch kind {
	case KindIdentity:
		p.Shape = []int64{int64(n)}
		p.OutShape = p.Shape
	case KindMLP:
		if n%16 != 0 {
			return nil, fmt.Errorf("mlp payload of %d bytes: must be a multiple of 64 (rows of 16 f32)", size)
		}
		p.Shape = []int64{int64(n / 16), 16}
		p.OutShape = []int64{int64(n / 16), 4}
	default:
		return nil, fmt.Errorf("unknown payload kind %q (identity, mlp, image)", kind)
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

// needF32 refuses payloads a transport cannot carry (images go over tensord only).
func (p *Payload) needF32(transport string) error {
	if p.Bytes {
		return fmt.Errorf("%s: the bench sends %s payloads over tensord transports only", transport, p.Kind)
	}
	return nil
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
	if p.Kind == KindIdentity {
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
	if p.Kind == KindIdentity {
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
