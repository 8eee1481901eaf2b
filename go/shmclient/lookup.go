package shmclient

import (
	"fmt"
	"strconv"
	"unsafe"
)

// Outputs by name and typed accessors that return errors. The views in tensor.go
// (Float32s, ...) panic on a wrong dtype, which suits code that checked the model's
// signature; these suit code that handles whatever came back.

// Tensors is a list of tensors, such as the outputs Infer returns, in the model's order.
type Tensors []Tensor

// Get returns the tensor called name, or an error naming the tensors there are.
func (ts Tensors) Get(name string) (Tensor, error) {
	for _, t := range ts {
		if t.Name == name {
			return t, nil
		}
	}
	names := make([]string, len(ts))
	for i, t := range ts {
		names[i] = t.Name
	}
	return Tensor{}, fmt.Errorf("shmclient: no tensor %s among %v", strconv.Quote(name), names)
}

// Lookup returns the tensor called name, or false.
func (ts Tensors) Lookup(name string) (Tensor, bool) {
	for _, t := range ts {
		if t.Name == name {
			return t, true
		}
	}
	return Tensor{}, false
}

// checkedView is view that returns an error instead of panicking.
func checkedView[E any](t Tensor, want DType) ([]E, error) {
	if t.DType != want {
		return nil, fmt.Errorf("shmclient: tensor %s has dtype %v, not %v", strconv.Quote(t.Name), t.DType, want)
	}
	var zero E
	size := int(unsafe.Sizeof(zero))
	if len(t.Data) == 0 {
		return []E{}, nil
	}
	if len(t.Data)%size != 0 {
		return nil, fmt.Errorf("shmclient: tensor %s: %d bytes is not a whole number of %v elements", strconv.Quote(t.Name), len(t.Data), t.DType)
	}
	if uintptr(unsafe.Pointer(unsafe.SliceData(t.Data)))%unsafe.Alignof(zero) != 0 {
		return nil, fmt.Errorf("shmclient: tensor %s: data is not aligned for %v (Clone it)", strconv.Quote(t.Name), t.DType)
	}
	return view[E](t, want), nil
}

// Typed zero-copy views of Data, like Float32s and the rest, that return an error when
// DType does not match (or the data is not a whole, aligned number of elements) instead
// of panicking.

func (t Tensor) AsFloat32s() ([]float32, error) { return checkedView[float32](t, F32) }
func (t Tensor) AsFloat64s() ([]float64, error) { return checkedView[float64](t, F64) }
func (t Tensor) AsInt64s() ([]int64, error)     { return checkedView[int64](t, I64) }
func (t Tensor) AsInt32s() ([]int32, error)     { return checkedView[int32](t, I32) }
func (t Tensor) AsInt16s() ([]int16, error)     { return checkedView[int16](t, I16) }
func (t Tensor) AsInt8s() ([]int8, error)       { return checkedView[int8](t, I8) }
func (t Tensor) AsUint8s() ([]uint8, error)     { return checkedView[uint8](t, U8) }

// AsBools is Bools with an error for a wrong dtype or a byte that is neither 0 nor 1.
func (t Tensor) AsBools() ([]bool, error) {
	if t.DType != Bool {
		return nil, fmt.Errorf("shmclient: tensor %s has dtype %v, not %v", strconv.Quote(t.Name), t.DType, Bool)
	}
	for i, b := range t.Data {
		if b > 1 {
			return nil, fmt.Errorf("shmclient: tensor %s: bool element %d is %d", strconv.Quote(t.Name), i, b)
		}
	}
	return view[bool](t, Bool), nil
}

// AsFloat32sFromHalf is Float32sFromHalf (a widened copy of an F16 or BF16 tensor) with
// an error for any other dtype.
func (t Tensor) AsFloat32sFromHalf() ([]float32, error) {
	if t.DType != F16 && t.DType != BF16 {
		return nil, fmt.Errorf("shmclient: tensor %s has dtype %v, not f16 or bf16", strconv.Quote(t.Name), t.DType)
	}
	if len(t.Data)%2 != 0 {
		return nil, fmt.Errorf("shmclient: tensor %s: %d bytes is not a whole number of %v elements", strconv.Quote(t.Name), len(t.Data), t.DType)
	}
	return t.Float32sFromHalf(), nil
}
