package shmclient

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Error messages here quote names with strconv.Quote and print shapes with fmtShape rather
// than handing them to fmt: escape analysis would otherwise move every caller's shape
// and name to the heap, for the sake of an error path, and the zero-copy path would
// allocate (alloc_test.go).

// checkSpecs applies the SPEC §7 limits and, when the model's metadata is cached, its
// signature, so a bad call fails before a byte is written to shared memory.
func checkSpecs(model string, specs []TensorSpec, info *ModelInfo) error {
	if model == "" || len(model) > maxNameLen {
		return fmt.Errorf("%w: model name of %d bytes (must be 1..%d)", ErrBadRequest, len(model), maxNameLen)
	}
	if len(specs) > maxTensors {
		return fmt.Errorf("%w: model %s: %d inputs, the limit is %d per request", ErrBadRequest, strconv.Quote(model), len(specs), maxTensors)
	}
	for i, s := range specs {
		if s.Name == "" || len(s.Name) > maxNameLen {
			return fmt.Errorf("%w: input name %s must be 1..%d bytes", ErrBadRequest, strconv.Quote(s.Name), maxNameLen)
		}
		for _, prev := range specs[:i] {
			if prev.Name == s.Name {
				return badInputf("model %s: input %s given twice", strconv.Quote(model), strconv.Quote(s.Name))
			}
		}
		if !s.DType.valid() {
			return badInputf("model %s: input %s has invalid dtype %v", strconv.Quote(model), strconv.Quote(s.Name), s.DType)
		}
		if len(s.Shape) > maxRank {
			return badInputf("model %s: input %s has rank %d, the limit is %d", strconv.Quote(model), strconv.Quote(s.Name), len(s.Shape), maxRank)
		}
		n, err := numElements(s.Shape)
		if err != nil {
			return badInputf("model %s: input %s: %v", strconv.Quote(model), strconv.Quote(s.Name), err)
		}
		if s.DType == Bytes {
			if s.NBytes < 0 || n > math.MaxInt64/4 || s.NBytes < 4*n {
				return badInputf("model %s: bytes input %s of %d strings needs NBytes >= %d (4 bytes of length per string), got %d", strconv.Quote(model), strconv.Quote(s.Name), n, 4*n, s.NBytes)
			}
		} else if n > math.MaxInt64/int64(s.DType.Size()) {
			return badInputf("model %s: input %s: shape %v is too large", strconv.Quote(model), strconv.Quote(s.Name), fmtShape(s.Shape))
		}
	}
	if info == nil {
		return nil
	}
	if len(specs) != len(info.Inputs) {
		return badInputf("model %s takes %d inputs (%s), got %d", strconv.Quote(model), len(info.Inputs), describeSpecs(info.Inputs), len(specs))
	}
	for _, s := range specs {
		var want *TensorSpec
		for i := range info.Inputs {
			if info.Inputs[i].Name == s.Name {
				want = &info.Inputs[i]
			}
		}
		if want == nil {
			return badInputf("model %s has no input %s; its inputs are %s", strconv.Quote(model), strconv.Quote(s.Name), describeSpecs(info.Inputs))
		}
		if want.DType.valid() && want.DType != s.DType {
			return badInputf("model %s: input %s must be %v, got %v", strconv.Quote(model), strconv.Quote(s.Name), want.DType, s.DType)
		}
		if want.Shape == nil {
			continue
		}
		if len(want.Shape) != len(s.Shape) {
			return badInputf("model %s: input %s must have shape %s (rank %d), got %v", strconv.Quote(model), strconv.Quote(s.Name), shapeString(want.Shape), len(want.Shape), fmtShape(s.Shape))
		}
		for i, d := range want.Shape {
			if d >= 0 && d != s.Shape[i] {
				return badInputf("model %s: input %s must have shape %s, got %v (dimension %d)", strconv.Quote(model), strconv.Quote(s.Name), shapeString(want.Shape), fmtShape(s.Shape), i)
			}
		}
	}
	return nil
}

func describeSpecs(specs []TensorSpec) string {
	parts := make([]string, len(specs))
	for i, s := range specs {
		parts[i] = s.String()
	}
	return strings.Join(parts, ", ")
}

// shapeString writes -1 dimensions as "?" and a nil shape as "[*]" (any rank).
func shapeString(shape []int64) string {
	if shape == nil {
		return "[*]"
	}
	parts := make([]string, len(shape))
	for i, d := range shape {
		if d < 0 {
			parts[i] = "?"
		} else {
			parts[i] = fmt.Sprint(d)
		}
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// specNBytes is the data size of an input: shape times element size, or NBytes for Bytes.
func specNBytes(s TensorSpec) uint64 {
	if s.DType == Bytes {
		return uint64(s.NBytes)
	}
	n, _ := numElements(s.Shape)
	return uint64(n) * uint64(s.DType.Size())
}

// fmtShape prints a shape as %v would ("[2 3]") without letting it escape.
func fmtShape(shape []int64) string {
	b := append(make([]byte, 0, 32), '[')
	for i, d := range shape {
		if i > 0 {
			b = append(b, ' ')
		}
		b = strconv.AppendInt(b, d, 10)
	}
	return string(append(b, ']'))
}
