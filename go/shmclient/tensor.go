package shmclient

import (
	"encoding/binary"
	"fmt"
	"math"
	"strconv"
	"unsafe"
)

// Tensor is a named, typed, row-major (C order), little-endian n-dimensional array.
//
// Data holds the raw bytes. For tensors built by the From* constructors Data aliases the
// caller's slice; for Request.Input and Response.Outputs it is a view into shared memory
// that is valid only until Do/Abandon or Release respectively. A Bytes tensor holds the
// layout of SPEC §5: product(Shape) u32 lengths, then the strings concatenated.
type Tensor struct {
	Name  string
	DType DType
	Shape []int64
	Data  []byte
}

// TensorSpec describes a tensor without its data: a model's declared input or output
// (from Models), or the shape of an input to reserve with NewRequest.
//
// In model metadata a -1 dimension accepts any size, a nil Shape any rank and AnyDType
// any dtype. In NewRequest every dimension must be known; a nil Shape is a scalar, and for
// the Bytes dtype NBytes gives the size of the data (SPEC §5 layout) to reserve.
type TensorSpec struct {
	Name   string
	DType  DType
	Shape  []int64
	NBytes int64 // Bytes dtype only, NewRequest only
	// Meaning says what the values are, in model metadata (SPEC §2.4): "image" (encoded
	// image files), "pixels" (u8 [N,H,W,3] RGB), "text" (UTF-8 strings), "labels", "scores",
	// "classes", "logits", "embedding"; "" when the model does not say.
	Meaning string
}

// NumElements is the product of Shape (1 for a scalar).
func (t Tensor) NumElements() int64 {
	n, _ := numElements(t.Shape)
	return n
}

// numElements multiplies dims, failing on negative dims and on overflow, both of which a
// peer (or a caller) could otherwise use to make a huge or negative size look small.
func numElements(shape []int64) (int64, error) {
	n := int64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("negative dimension %d in shape %s", d, fmtShape(shape))
		}
		if d != 0 && n > math.MaxInt64/d {
			return 0, fmt.Errorf("shape %s overflows", fmtShape(shape))
		}
		n *= d
	}
	return n, nil
}

// checkData verifies len(Data) against Shape and DType (SPEC §5). Its errors do not let
// t's name or shape escape (see validate.go).
func (t Tensor) checkData() error {
	if !t.DType.valid() {
		return fmt.Errorf("tensor %s: invalid dtype %v", strconv.Quote(t.Name), t.DType)
	}
	if len(t.Shape) > maxRank {
		return fmt.Errorf("tensor %s: rank %d exceeds the limit of %d", strconv.Quote(t.Name), len(t.Shape), maxRank)
	}
	n, err := numElements(t.Shape)
	if err != nil {
		return fmt.Errorf("tensor %s: %v", strconv.Quote(t.Name), err)
	}
	if t.DType == Bytes {
		if err := checkByteStrings(t.Data, n); err != nil {
			return fmt.Errorf("tensor %s: %v", strconv.Quote(t.Name), err)
		}
		return nil
	}
	sz := int64(t.DType.Size())
	if n > math.MaxInt64/sz || int64(len(t.Data)) != n*sz {
		return fmt.Errorf("tensor %s: %d bytes of data, but shape %s of %v needs %d", strconv.Quote(t.Name), len(t.Data), fmtShape(t.Shape), t.DType, n*sz)
	}
	if t.DType == Bool {
		for i, b := range t.Data {
			if b > 1 {
				return fmt.Errorf("tensor %s: bool element %d is %d, not 0 or 1", strconv.Quote(t.Name), i, b)
			}
		}
	}
	return nil
}

// view reinterprets Data as []E. It panics on a dtype mismatch or misaligned data: both
// are programming errors, and a silently nil or copied slice would hide writes.
func view[E any](t Tensor, want ...DType) []E {
	ok := false
	for _, d := range want {
		ok = ok || t.DType == d
	}
	if !ok {
		panic(fmt.Sprintf("shmclient: tensor %q has dtype %v, not %v", t.Name, t.DType, want[0]))
	}
	var zero E
	size := int(unsafe.Sizeof(zero))
	if len(t.Data) == 0 {
		return []E{}
	}
	if len(t.Data)%size != 0 {
		panic(fmt.Sprintf("shmclient: tensor %q: %d bytes is not a whole number of %v elements", t.Name, len(t.Data), t.DType))
	}
	p := unsafe.Pointer(unsafe.SliceData(t.Data))
	if uintptr(p)%unsafe.Alignof(zero) != 0 {
		panic(fmt.Sprintf("shmclient: tensor %q: data is not aligned for %v", t.Name, t.DType))
	}
	return unsafe.Slice((*E)(p), len(t.Data)/size)
}

func bytesOf[E any](s []E) []byte {
	if len(s) == 0 {
		return []byte{}
	}
	var zero E
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(s))), len(s)*int(unsafe.Sizeof(zero)))
}

// Typed zero-copy views of Data. Writes through them change Data (and shared memory, for
// request inputs). They panic when DType does not match.

func (t Tensor) Float32s() []float32 { return view[float32](t, F32) }
func (t Tensor) Float64s() []float64 { return view[float64](t, F64) }
func (t Tensor) Int64s() []int64     { return view[int64](t, I64) }
func (t Tensor) Int32s() []int32     { return view[int32](t, I32) }
func (t Tensor) Int16s() []int16     { return view[int16](t, I16) }
func (t Tensor) Int8s() []int8       { return view[int8](t, I8) }
func (t Tensor) Uint8s() []uint8     { return view[uint8](t, U8) }

// Uint16s returns the raw bits of an F16 or BF16 tensor; see Float16ToFloat32 and
// BFloat16ToFloat32.
func (t Tensor) Uint16s() []uint16 { return view[uint16](t, F16, BF16) }

// Bools returns a Bool tensor as []bool. It panics if a byte is neither 0 nor 1, which
// SPEC §5 forbids and which Go's bool cannot represent safely. Response outputs are
// checked on arrival, so this only fires for data built by the caller.
func (t Tensor) Bools() []bool {
	for i, b := range t.Data {
		if b > 1 {
			panic(fmt.Sprintf("shmclient: tensor %q: bool element %d is %d", t.Name, i, b))
		}
	}
	return view[bool](t, Bool)
}

// Float32sFromHalf returns an F16 or BF16 tensor's values widened to float32 (a copy).
func (t Tensor) Float32sFromHalf() []float32 {
	bits := t.Uint16s()
	conv := Float16ToFloat32
	if t.DType == BF16 {
		conv = BFloat16ToFloat32
	}
	out := make([]float32, len(bits))
	for i, b := range bits {
		out[i] = conv(b)
	}
	return out
}

// ByteStrings splits a Bytes tensor into its strings; they alias Data.
func (t Tensor) ByteStrings() ([][]byte, error) {
	if t.DType != Bytes {
		return nil, fmt.Errorf("%w: tensor %q has dtype %v, not bytes", ErrBadInput, t.Name, t.DType)
	}
	n, err := numElements(t.Shape)
	if err != nil {
		return nil, fmt.Errorf("%w: tensor %q: %v", ErrBadInput, t.Name, err)
	}
	s, err := splitByteStrings(t.Data, n)
	if err != nil {
		return nil, fmt.Errorf("%w: tensor %q: %v", ErrBadInput, t.Name, err)
	}
	return s, nil
}

// Strings returns a Bytes tensor's strings as Go strings (copies).
func (t Tensor) Strings() ([]string, error) {
	bs, err := t.ByteStrings()
	if err != nil {
		return nil, err
	}
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = string(b)
	}
	return out, nil
}

// checkByteStrings checks the SPEC §5 bytes layout of n strings. Lengths come from
// untrusted memory, so all arithmetic stays within len(data).
func checkByteStrings(data []byte, n int64) error {
	if n > int64(len(data))/4 {
		return fmt.Errorf("bytes tensor of %d strings needs at least %d bytes of lengths, has %d", n, 4*n, len(data))
	}
	pos := 4 * n
	for i := int64(0); i < n; i++ {
		l := int64(binary.LittleEndian.Uint32(data[4*i:]))
		if l > int64(len(data))-pos {
			return fmt.Errorf("bytes tensor: string %d of %d bytes runs past the end of the data", i, l)
		}
		pos += l
	}
	if pos != int64(len(data)) {
		return fmt.Errorf("bytes tensor: %d bytes of data, strings need %d", len(data), pos)
	}
	return nil
}

// splitByteStrings splits data, which checkByteStrings accepts, into its n strings.
// (Checking apart from splitting keeps checkData from letting data escape.)
func splitByteStrings(data []byte, n int64) ([][]byte, error) {
	if err := checkByteStrings(data, n); err != nil {
		return nil, err
	}
	out := make([][]byte, n)
	pos := 4 * n
	for i := range out {
		l := int64(binary.LittleEndian.Uint32(data[4*i:]))
		out[i] = data[pos : pos+l : pos+l]
		pos += l
	}
	return out, nil
}

// Constructors. Numeric ones alias data (no copy): keep it unchanged until the call that
// sends the tensor returns. A nil shape means a scalar.

func FromFloat32(name string, shape []int64, data []float32) Tensor {
	return Tensor{Name: name, DType: F32, Shape: shape, Data: bytesOf(data)}
}
func FromFloat64(name string, shape []int64, data []float64) Tensor {
	return Tensor{Name: name, DType: F64, Shape: shape, Data: bytesOf(data)}
}
func FromInt64(name string, shape []int64, data []int64) Tensor {
	return Tensor{Name: name, DType: I64, Shape: shape, Data: bytesOf(data)}
}
func FromInt32(name string, shape []int64, data []int32) Tensor {
	return Tensor{Name: name, DType: I32, Shape: shape, Data: bytesOf(data)}
}
func FromInt16(name string, shape []int64, data []int16) Tensor {
	return Tensor{Name: name, DType: I16, Shape: shape, Data: bytesOf(data)}
}
func FromInt8(name string, shape []int64, data []int8) Tensor {
	return Tensor{Name: name, DType: I8, Shape: shape, Data: bytesOf(data)}
}
func FromUint8(name string, shape []int64, data []uint8) Tensor {
	return Tensor{Name: name, DType: U8, Shape: shape, Data: data}
}
func FromBool(name string, shape []int64, data []bool) Tensor {
	return Tensor{Name: name, DType: Bool, Shape: shape, Data: bytesOf(data)}
}

// FromFloat16Bits and FromBFloat16Bits take raw half-precision bits; convert float32
// values with Float32ToFloat16 / Float32ToBFloat16.
func FromFloat16Bits(name string, shape []int64, bits []uint16) Tensor {
	return Tensor{Name: name, DType: F16, Shape: shape, Data: bytesOf(bits)}
}
func FromBFloat16Bits(name string, shape []int64, bits []uint16) Tensor {
	return Tensor{Name: name, DType: BF16, Shape: shape, Data: bytesOf(bits)}
}

// FromBytes builds a Bytes tensor (copying the strings into the SPEC §5 layout).
// A nil shape means a 1-D tensor of len(strs) strings.
func FromBytes(name string, shape []int64, strs [][]byte) Tensor {
	total := 4 * len(strs)
	for _, s := range strs {
		total += len(s)
	}
	data := make([]byte, 4*len(strs), total)
	for i, s := range strs {
		binary.LittleEndian.PutUint32(data[4*i:], uint32(len(s)))
		data = append(data, s...)
	}
	if shape == nil {
		shape = []int64{int64(len(strs))}
	}
	return Tensor{Name: name, DType: Bytes, Shape: shape, Data: data}
}

// FromStrings is FromBytes for Go strings.
func FromStrings(name string, shape []int64, strs []string) Tensor {
	bs := make([][]byte, len(strs))
	for i, s := range strs {
		bs[i] = unsafe.Slice(unsafe.StringData(s), len(s))
	}
	return FromBytes(name, shape, bs)
}

// Clone returns a deep copy whose Data is ordinary Go memory, e.g. to keep an output
// after Response.Release.
func (t Tensor) Clone() Tensor {
	c := t
	c.Shape = append([]int64(nil), t.Shape...)
	if c.Shape == nil {
		c.Shape = []int64{}
	}
	c.Data = alignedCopy(t.Data)
	return c
}

// alignedCopy copies into 8-byte-aligned memory so the typed views work on the copy.
func alignedCopy(b []byte) []byte {
	words := make([]uint64, (len(b)+7)/8)
	out := bytesOf(words)[:len(b):len(b)]
	copy(out, b)
	return out
}

// String describes the spec as the daemon's messages do: "x f32[?,16]", with ? for a
// dimension of any size and [*] for any rank.
func (s TensorSpec) String() string {
	return s.Name + " " + s.DType.String() + shapeString(s.Shape)
}

// String describes the tensor without its data: "y f32[2,3] (24 bytes)".
func (t Tensor) String() string {
	shape := t.Shape
	if shape == nil {
		shape = []int64{}
	}
	return fmt.Sprintf("%s %v%s (%d bytes)", t.Name, t.DType, shapeString(shape), len(t.Data))
}
