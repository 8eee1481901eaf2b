package shmclient

import (
	"encoding/binary"
	"fmt"
	"strconv"
)

// Check tests inputs against the model's signature and Limits the way the daemon will, so
// a caller can refuse or split a request before sending it: too many items (MaxBatch), an
// image file or text longer than MaxBytes, an image in a format the model does not decode
// (Formats, told by its leading bytes). Errors wrap ErrBadInput (ErrBadRequest for a
// request the SPEC's limits refuse). What only decoding can tell (MaxPixels, corrupt
// data) is left to the daemon.
func (m *ModelInfo) Check(inputs ...Tensor) error {
	if len(inputs) > maxTensors {
		return fmt.Errorf("%w: model %s: %d inputs, the limit is %d per request", ErrBadRequest, strconv.Quote(m.Name), len(inputs), maxTensors)
	}
	specs := make([]TensorSpec, len(inputs))
	for i, t := range inputs {
		if err := t.checkData(); err != nil {
			return badInputf("model %s: %v", strconv.Quote(m.Name), err)
		}
		specs[i] = TensorSpec{Name: t.Name, DType: t.DType, Shape: t.Shape, NBytes: int64(len(t.Data))}
	}
	if err := checkSpecs(m.Name, specs, m); err != nil {
		return err
	}
	l := m.Limits
	for _, t := range inputs {
		if l.MaxBatch > 0 && len(t.Shape) > 0 && t.Shape[0] > int64(l.MaxBatch) {
			return badInputf("model %s takes at most %d items per request (limits.max_batch), input %s has %d", strconv.Quote(m.Name), l.MaxBatch, strconv.Quote(t.Name), t.Shape[0])
		}
		if t.DType != Bytes {
			continue
		}
		items, _ := t.ByteStrings() // checkData accepted the layout
		for i, b := range items {
			if l.MaxBytes > 0 && uint64(len(b)) > l.MaxBytes {
				return badInputf("model %s: input %s item %d is %d bytes, the model takes at most %d (limits.max_bytes)", strconv.Quote(m.Name), strconv.Quote(t.Name), i, len(b), l.MaxBytes)
			}
			if len(l.Formats) > 0 && m.meaning(t.Name) == "image" {
				if f := ImageFormat(b); f != "" && !contains(l.Formats, f) {
					return badInputf("model %s: input %s item %d is %s, the model decodes %v (limits.formats)", strconv.Quote(m.Name), strconv.Quote(t.Name), i, f, l.Formats)
				}
			}
		}
	}
	return nil
}

func (m *ModelInfo) meaning(input string) string {
	for _, s := range m.Inputs {
		if s.Name == input {
			return s.Meaning
		}
	}
	return ""
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// ImageFormat names an encoded image's format from its leading bytes, as ModelLimits.Formats
// does ("png", "jpeg", "webp", "gif", "bmp", "tiff"), or returns "" when it is none of them.
func ImageFormat(b []byte) string {
	switch {
	case len(b) >= 8 && string(b[:8]) == "\x89PNG\r\n\x1a\n":
		return "png"
	case len(b) >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff:
		return "jpeg"
	case len(b) >= 12 && string(b[:4]) == "RIFF" && string(b[8:12]) == "WEBP":
		return "webp"
	case len(b) >= 6 && (string(b[:6]) == "GIF87a" || string(b[:6]) == "GIF89a"):
		return "gif"
	case len(b) >= 2 && string(b[:2]) == "BM":
		return "bmp"
	case len(b) >= 4 && (binary.LittleEndian.Uint32(b) == 0x002a4949 || binary.BigEndian.Uint32(b) == 0x4d4d002a):
		return "tiff"
	}
	return ""
}
