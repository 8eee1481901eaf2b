package shmclient

import (
	"fmt"
	"math"
	"strings"
)

// checkSpecs applies the SPEC §7 limits and, when the model's metadata is cached, its
// signature, so a bad call fails before a byte is written to shared memory.
func checkSpecs(model string, specs []TensorSpec, info *ModelInfo) error {
	if model == "" || len(model) > maxNameLen {
		return fmt.Errorf("%w: model name of %d bytes (must be 1..%d)", ErrBadRequest, len(model), maxNameLen)
	}
	if len(specs) > maxTensors {
		return fmt.Errorf("%w: model %q: %d inputs, the limit is %d per request", ErrBadRequest, model, len(specs), maxTensors)
	}
	seen := make(map[string]bool, len(specs))
	for _, s := range specs {
		if s.Name == "" || len(s.Name) > maxNameLen {
			return fmt.Errorf("%w: input name %q must be 1..%d bytes", ErrBadRequest, s.Name, maxNameLen)
		}
		if seen[s.Name] {
			return badInputf("model %q: input %q given twice", model, s.Name)
		}
		seen[s.Name] = true
		if !s.DType.valid() {
			return badInputf("model %q: input %q has invalid dtype %v", model, s.Name, s.DType)
		}
		if len(s.Shape) > maxRank {
			return badInputf("model %q: input %q has rank %d, the limit is %d", model, s.Name, len(s.Shape), maxRank)
		}
		n, err := numElements(s.Shape)
		if err != nil {
			return badInputf("model %q: input %q: %v", model, s.Name, err)
		}
		if s.DType == Bytes {
			if s.NBytes < 0 || n > math.MaxInt64/4 || s.NBytes < 4*n {
				return badInputf("model %q: bytes input %q of %d strings needs NBytes >= %d (4 bytes of length per string), got %d", model, s.Name, n, 4*n, s.NBytes)
			}
		} else if n > math.MaxInt64/int64(s.DType.Size()) {
			return badInputf("model %q: input %q: shape %v is too large", model, s.Name, s.Shape)
		}
	}
	if info == nil {
		return nil
	}
	if len(specs) != len(info.Inputs) {
		return badInputf("model %q takes %d inputs (%s), got %d", model, len(info.Inputs), describeSpecs(info.Inputs), len(specs))
	}
	for _, s := range specs {
		var want *TensorSpec
		for i := range info.Inputs {
			if info.Inputs[i].Name == s.Name {
				want = &info.Inputs[i]
			}
		}
		if want == nil {
			return badInputf("model %q has no input %q; its inputs are %s", model, s.Name, describeSpecs(info.Inputs))
		}
		if want.DType.valid() && want.DType != s.DType {
			return badInputf("model %q: input %q must be %v, got %v", model, s.Name, want.DType, s.DType)
		}
		if want.Shape == nil {
			continue
		}
		if len(want.Shape) != len(s.Shape) {
			return badInputf("model %q: input %q must have shape %s (rank %d), got %v", model, s.Name, shapeString(want.Shape), len(want.Shape), s.Shape)
		}
		for i, d := range want.Shape {
			if d >= 0 && d != s.Shape[i] {
				return badInputf("model %q: input %q must have shape %s, got %v (dimension %d)", model, s.Name, shapeString(want.Shape), s.Shape, i)
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
