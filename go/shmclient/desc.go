package shmclient

import (
	"fmt"
	"math"
)

// The descriptors of ring records (SPEC §4.4): their wire structs and codecs.
//
// Specialized paths of the package's one msgpack codec (encode.go, decode.go) for the two
// descriptors every request carries. The general paths (the reflective encoder, the
// generic tree plus fromTree) cost several microseconds and dozens of allocations per
// request, more than the rest of the client's work on a small request. These functions
// produce and accept exactly what the general paths do, with the same primitives;
// vectors_test.go and desc_test.go hold them to that, against the golden vectors and
// against the general code.

type tensorRef struct {
	Name   string   `msgpack:"name"`
	DType  string   `msgpack:"dtype"`
	Shape  []uint64 `msgpack:"shape"`
	Offset uint64   `msgpack:"offset"`
	NBytes uint64   `msgpack:"nbytes"`
}

// requestDesc and tensorRef are also encoded by hand (below), which writes the same
// keys in the same order; desc_test.go checks the two encoders agree. (The client only
// encodes request descriptors and only decodes response descriptors; the other
// directions, which the golden vector tests need, live in messages_test.go.)
type requestDesc struct {
	Model     string      `msgpack:"model"`
	TimeoutUS uint64      `msgpack:"timeout_us"`
	Inputs    []tensorRef `msgpack:"inputs"`
	Priority  uint64      `msgpack:"priority,omitempty"` // SPEC §4.4: written only when not 0
}

type descError struct {
	Code    uint64 `msgpack:"code"`
	Name    string `msgpack:"name"`
	Message string `msgpack:"message"`
	// Version 5, written only when known (SPEC §6 "Error fields"): pointers, since item 0
	// and limit 0 are values.
	Input string  `msgpack:"input,omitempty"`
	Item  *uint64 `msgpack:"item,omitempty"`
	Limit *uint64 `msgpack:"limit,omitempty"`
}

// responseDesc has exactly one of its keys on the wire (SPEC §4.4).
type responseDesc struct {
	Outputs []tensorRef `msgpack:"outputs,omitempty"`
	Error   *descError  `msgpack:"error,omitempty"`
}

func decodeResponseDesc(b []byte) (*responseDesc, error) {
	if d, ok := decodeResponseOutputs(b); ok {
		return d, nil
	}
	return decodeResponseDescGeneral(b)
}

// decodeResponseDescGeneral accepts every valid encoding and words every error;
// decodeResponseDesc tries the fast path for the common case first.
func decodeResponseDescGeneral(b []byte) (*responseDesc, error) {
	tree, err := decodeMsgpack(b)
	if err != nil {
		return nil, err
	}
	m, ok := tree.(mpMap)
	if !ok || len(m) != 1 {
		return nil, fmt.Errorf("response descriptor must be a map with exactly one key")
	}
	var d responseDesc
	if err := fromTree(m, &d, "response"); err != nil {
		return nil, err
	}
	if m[0].Key != "outputs" && m[0].Key != "error" {
		return nil, fmt.Errorf("response descriptor has key %q, want outputs or error", m[0].Key)
	}
	if m[0].Value == nil {
		// SPEC §4.4: outputs is an array, error a map; nil is neither (found by fuzzing).
		return nil, fmt.Errorf("response descriptor's %s is nil", m[0].Key)
	}
	if m[0].Key == "outputs" && d.Outputs == nil {
		d.Outputs = []tensorRef{}
	}
	if len(d.Outputs) > maxTensors {
		return nil, fmt.Errorf("response descriptor has %d outputs, the limit is %d", len(d.Outputs), maxTensors)
	}
	return &d, nil
}

// Request descriptor encoder.
//
// requestDescLen and appendRequestDesc walk the same fields in the same canonical order
// (SPEC §2.3, §4.4: the declaration order of requestDesc and tensorRef); the length is
// computed arithmetically so that a record can be laid out before the descriptor is
// written, and the descriptor is then encoded once, straight into the record. Send checks
// that the two agree, so a future edit to one and not the other fails loudly instead of
// publishing a torn record. Nil slices encode as empty arrays: the SPEC has no nil there.

// requestDescLen returns the length of the canonical encoding of d.
func requestDescLen(d *requestDesc) int {
	n := 1 + // fixmap of 3 (4 with a priority)
		strLen("model") + strLen(d.Model) +
		strLen("timeout_us") + uintLen(d.TimeoutUS) +
		strLen("inputs") + arrayHeaderLen(len(d.Inputs))
	if d.Priority != 0 {
		n += strLen("priority") + uintLen(d.Priority)
	}
	for i := range d.Inputs {
		in := &d.Inputs[i]
		n += 1 + // fixmap of 5
			strLen("name") + strLen(in.Name) +
			strLen("dtype") + strLen(in.DType) +
			strLen("shape") + arrayHeaderLen(len(in.Shape)) +
			strLen("offset") + uintLen(in.Offset) +
			strLen("nbytes") + uintLen(in.NBytes)
		for _, dim := range in.Shape {
			n += uintLen(dim)
		}
	}
	return n
}

// appendRequestDesc appends the canonical encoding of d to b; it writes in place when b
// has room for requestDescLen(d) more bytes.
func appendRequestDesc(b []byte, d *requestDesc) []byte {
	if d.Priority != 0 {
		b = append(b, 0x80|4)
	} else {
		b = append(b, 0x80|3)
	}
	b = appendStr(b, "model")
	b = appendStr(b, d.Model)
	b = appendStr(b, "timeout_us")
	b = appendUint(b, d.TimeoutUS)
	b = appendStr(b, "inputs")
	b = appendArrayHeader(b, len(d.Inputs))
	for i := range d.Inputs {
		in := &d.Inputs[i]
		b = append(b, 0x80|5)
		b = appendStr(b, "name")
		b = appendStr(b, in.Name)
		b = appendStr(b, "dtype")
		b = appendStr(b, in.DType)
		b = appendStr(b, "shape")
		b = appendArrayHeader(b, len(in.Shape))
		for _, dim := range in.Shape {
			b = appendUint(b, dim)
		}
		b = appendStr(b, "offset")
		b = appendUint(b, in.Offset)
		b = appendStr(b, "nbytes")
		b = appendUint(b, in.NBytes)
	}
	if d.Priority != 0 {
		b = appendStr(b, "priority")
		b = appendUint(b, d.Priority)
	}
	return b
}

// Response descriptor decoder.

// decodeResponseOutputs is the fast path of decodeResponseDesc for the descriptor of
// every successful response: {"outputs": [ref, ...]}, each ref a map of exactly its five
// keys in canonical order, integers in the unsigned family, strings in the str family
// (header widths may be any). ok is false for anything else, valid or not (an error
// response, another key order, extra keys, nil, signed integers, ...): the caller then
// runs the general decoder, which accepts or rejects it and words the error. So this
// path decides nothing on its own; whatever it accepts, the general decoder accepts with
// the same result.
func decodeResponseOutputs(b []byte) (d *responseDesc, ok bool) {
	outs, _, ok := decodeOutputsInto(b, nil, nil)
	if !ok {
		return nil, false
	}
	return &responseDesc{Outputs: outs}, true
}

// decodeOutputsInto is decodeResponseOutputs into buffers a call reuses from response
// to response: refs (over its whole capacity: a name equal to the one already there is
// kept, not allocated again) and dims, the backing array of the shapes. It returns the
// buffers, grown if they had to be.
func decodeOutputsInto(b []byte, refs []tensorRef, dims []uint64) (_ []tensorRef, _ []uint64, ok bool) {
	r := fastReader{b: b}
	if r.mapLen() != 1 || string(r.str()) != "outputs" {
		return refs, dims, false
	}
	n := r.arrayLen()
	// Each ref takes at least one byte per key: a count beyond that is a lie, and must
	// not size an allocation. Over the SPEC's limit, the general decoder words the error.
	if r.failed || n > (len(b)-r.pos)/5 || n > maxTensors {
		return refs, dims, false
	}
	if n <= cap(refs) && refs != nil {
		refs = refs[:n]
	} else {
		grown := make([]tensorRef, n)
		copy(grown, refs[:cap(refs)])
		refs = grown
	}
	if dims == nil {
		dims = make([]uint64, 0, 8)
	}
	dims = dims[:0]
	for i := range refs {
		ref := &refs[i]
		if r.mapLen() != 5 || string(r.str()) != "name" {
			return refs, dims, false
		}
		if name := r.str(); string(name) != ref.Name {
			ref.Name = string(name)
		}
		if string(r.str()) != "dtype" {
			return refs, dims, false
		}
		ref.DType = internDType(r.str())
		if string(r.str()) != "shape" {
			return refs, dims, false
		}
		rank := r.arrayLen()
		if r.failed || rank > len(b)-r.pos {
			return refs, dims, false
		}
		start := len(dims)
		for j := 0; j < rank; j++ {
			dims = append(dims, r.uint())
		}
		ref.Shape = dims[start:len(dims):len(dims)]
		if string(r.str()) != "offset" {
			return refs, dims, false
		}
		ref.Offset = r.uint()
		if string(r.str()) != "nbytes" {
			return refs, dims, false
		}
		ref.NBytes = r.uint()
		if r.failed {
			return refs, dims, false
		}
	}
	if r.failed || r.pos != len(b) {
		return refs, dims, false
	}
	return refs, dims, true
}

// internDType returns the package's own string for a known dtype name, sparing an
// allocation per output; the comparison string(b) == name does not allocate.
func internDType(b []byte) string {
	for _, name := range dtypeNames {
		if string(b) == name {
			return name
		}
	}
	return string(b)
}

// fastReader reads the few msgpack forms decodeResponseOutputs accepts. Any other form,
// or running out of bytes, sets failed and yields zero values; callers check failed
// before trusting (or allocating by) what they read.
type fastReader struct {
	b      []byte
	pos    int
	failed bool
}

func (r *fastReader) next() byte {
	if r.pos >= len(r.b) {
		r.failed = true
		return 0
	}
	c := r.b[r.pos]
	r.pos++
	return c
}

// be reads an n-byte big-endian unsigned integer (n is 1, 2, 4 or 8).
func (r *fastReader) be(n int) uint64 {
	if n > len(r.b)-r.pos {
		r.failed = true
		return 0
	}
	var v uint64
	for _, c := range r.b[r.pos : r.pos+n] {
		v = v<<8 | uint64(c)
	}
	r.pos += n
	return v
}

func (r *fastReader) uint() uint64 {
	switch c := r.next(); {
	case c <= 0x7f:
		return uint64(c)
	case c >= 0xcc && c <= 0xcf:
		return r.be(1 << (c - 0xcc))
	}
	r.failed = true
	return 0
}

func (r *fastReader) str() []byte {
	var n uint64
	switch c := r.next(); {
	case c&0xe0 == 0xa0:
		n = uint64(c & 0x1f)
	case c >= 0xd9 && c <= 0xdb:
		n = r.be(1 << (c - 0xd9))
	default:
		r.failed = true
		return nil
	}
	if r.failed || n > uint64(len(r.b)-r.pos) {
		r.failed = true
		return nil
	}
	s := r.b[r.pos : r.pos+int(n)]
	r.pos += int(n)
	return s
}

// arrayLen and mapLen return -1 (and set failed) for anything but their own family.
func (r *fastReader) arrayLen() int {
	switch c := r.next(); {
	case c&0xf0 == 0x90:
		return int(c & 0x0f)
	case c == 0xdc || c == 0xdd:
		return int(min(r.be(2<<(c-0xdc)), math.MaxInt32))
	}
	r.failed = true
	return -1
}

func (r *fastReader) mapLen() int {
	switch c := r.next(); {
	case c&0xf0 == 0x80:
		return int(c & 0x0f)
	case c == 0xde || c == 0xdf:
		return int(min(r.be(2<<(c-0xde)), math.MaxInt32))
	}
	r.failed = true
	return -1
}
