package shmclient

import (
	"fmt"
	"math"
	"unsafe"
)

// DType is a tensor element type of SPEC §5. The zero value is invalid so that a Tensor
// whose DType was never set is caught before anything is written to shared memory.
type DType uint8

// The dtypes of SPEC §5, plus AnyDType, which only appears in model metadata.
const (
	InvalidDType DType = iota
	F16                // IEEE 754 binary16, raw bits in a uint16
	BF16               // bfloat16, raw bits in a uint16
	F32
	F64
	I8
	I16
	I32
	I64
	U8
	Bool  // one byte, 0 or 1
	Bytes // variable-length byte strings (SPEC §5)
	AnyDType
)

var dtypeNames = [...]string{
	InvalidDType: "invalid",
	F16:          "f16",
	BF16:         "bf16",
	F32:          "f32",
	F64:          "f64",
	I8:           "i8",
	I16:          "i16",
	I32:          "i32",
	I64:          "i64",
	U8:           "u8",
	Bool:         "bool",
	Bytes:        "bytes",
	AnyDType:     "any",
}

var dtypeSizes = [...]int{F16: 2, BF16: 2, F32: 4, F64: 8, I8: 1, I16: 2, I32: 4, I64: 8, U8: 1, Bool: 1}

// String returns the wire name ("f32", "bf16", ...).
func (d DType) String() string {
	if int(d) < len(dtypeNames) {
		return dtypeNames[d]
	}
	return fmt.Sprintf("DType(%d)", uint8(d))
}

// ParseDType parses a wire name. "any" parses to AnyDType.
func ParseDType(s string) (DType, error) {
	for i, n := range dtypeNames {
		if i != int(InvalidDType) && n == s {
			return DType(i), nil
		}
	}
	return InvalidDType, fmt.Errorf("shmclient: unknown dtype %q", s)
}

// Size is the number of bytes per element, or 0 for Bytes, AnyDType and invalid values.
func (d DType) Size() int {
	if int(d) < len(dtypeSizes) {
		return dtypeSizes[d]
	}
	return 0
}

// valid reports whether d may appear in a tensor on the wire.
func (d DType) valid() bool { return d >= F16 && d <= Bytes }

// The package reinterprets shared memory as Go slices, which is only correct when Go's
// byte order is the wire's (little-endian); refuse to run otherwise rather than corrupt data.
func init() {
	x := uint16(1)
	if *(*byte)(unsafe.Pointer(&x)) != 1 {
		panic("shmclient: big-endian hosts are not supported (the wire format is little-endian)")
	}
}

// BFloat16ToFloat32 converts raw bfloat16 bits to float32 (exact).
func BFloat16ToFloat32(b uint16) float32 {
	return math.Float32frombits(uint32(b) << 16)
}

// Float32ToBFloat16 converts to bfloat16 with round-to-nearest-even, as PyTorch does;
// NaNs stay NaN (quiet) instead of rounding into infinity.
func Float32ToBFloat16(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 0x0040
	}
	u += 0x7fff + (u>>16)&1
	return uint16(u >> 16)
}

// Float16ToFloat32 converts raw IEEE binary16 bits to float32 (exact).
func Float16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
	case mant == 0:
		return math.Float32frombits(sign)
	}
	// Subnormal half: normalise it, float32 has the exponent range to hold it exactly.
	e := uint32(113)
	for mant&0x400 == 0 {
		mant <<= 1
		e--
	}
	return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
}

// Float32ToFloat16 converts to IEEE binary16 with round-to-nearest-even; values beyond
// the half range become ±Inf, NaNs stay NaN.
func Float32ToFloat16(f float32) uint16 {
	u := math.Float32bits(f)
	sign := uint16(u>>16) & 0x8000
	exp := int32(u>>23) & 0xff
	mant := u & 0x7fffff
	if exp == 0xff {
		if mant != 0 {
			return sign | 0x7e00 | uint16(mant>>13)
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		if e < -10 {
			return sign // underflows to ±0
		}
		// Subnormal result: shift the mantissa (with its implicit 1) into place, then
		// round to nearest even on the bits shifted out.
		m := mant | 0x800000
		shift := uint32(14 - e)
		half := uint32(1) << (shift - 1)
		r := m >> shift
		rem := m & (1<<shift - 1)
		if rem > half || (rem == half && r&1 == 1) {
			r++
		}
		return sign | uint16(r)
	}
	r := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && r&1 == 1) {
		r++ // may carry into the exponent, which is the correct rounding up to Inf
	}
	return sign | uint16(r)
}
