package main

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"strconv"
	"unicode/utf8"
	"unsafe"

	"github.com/tensord/tensord/go/shmclient"
)

// JSON tensor data (the protocol's "data" arrays, flat or nested, row-major): parsed
// straight into tensord's little-endian layout and written back from it, without an
// []any in between; a 1 MiB tensor is a quarter of a million numbers.

// decodeJSONData parses raw, a JSON array (nested arrays are flattened) of n elements of
// dtype d, into tensord's layout.
func decodeJSONData(raw []byte, d shmclient.DType, n int64, tensor string) ([]byte, error) {
	if d == shmclient.Bytes {
		return decodeJSONStrings(raw, n, tensor)
	}
	if n > int64(len(raw)) { // every element takes at least one byte of JSON
		return nil, badRequest("input %q: %d bytes of JSON data cannot hold the %d elements of its shape", tensor, len(raw), n)
	}
	size := d.Size()
	out := make([]byte, 0, int(n)*size)
	count := int64(0)
	depth := 0
	value := false // the last token was a value or a closing bracket
	bad := func() error {
		return badRequest("input %q: data must be a JSON array of numbers (or of arrays)", tensor)
	}
	for i := 0; i < len(raw); {
		c := raw[i]
		switch c {
		case ' ', '\t', '\n', '\r':
			i++
			continue
		case ',':
			if !value || depth == 0 {
				return nil, bad()
			}
			value = false
			i++
			continue
		case '[':
			if value || (depth == 0 && i > 0 && count > 0) {
				return nil, bad()
			}
			depth++
			i++
			continue
		case ']':
			if depth == 0 || (!value && raw[i-1] != '[' && lastNonSpace(raw[:i]) != '[') {
				return nil, bad()
			}
			depth--
			value = true
			i++
			continue
		}
		if value || depth == 0 {
			return nil, bad()
		}
		j := i
		for j < len(raw) && raw[j] != ',' && raw[j] != ']' && raw[j] != ' ' && raw[j] != '\n' && raw[j] != '\t' && raw[j] != '\r' {
			j++
		}
		if count == n {
			return nil, badRequest("input %q: JSON data has more than the %d elements of its shape", tensor, n)
		}
		var err error
		out, err = appendValue(out, d, raw[i:j])
		if err != nil {
			return nil, badRequest("input %q: element %d: %v", tensor, count, err)
		}
		count++
		value = true
		i = j
	}
	if depth != 0 || len(raw) == 0 || raw[0] != '[' {
		return nil, badRequest("input %q: data must be a JSON array", tensor)
	}
	if count != n {
		return nil, badRequest("input %q: JSON data has %d elements, its shape has %d", tensor, count, n)
	}
	return out, nil
}

func lastNonSpace(b []byte) byte {
	for i := len(b) - 1; i >= 0; i-- {
		if c := b[i]; c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return c
		}
	}
	return 0
}

// str views b as a string without copying, for strconv (which does not keep it).
func str(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

func appendValue(out []byte, d shmclient.DType, tok []byte) ([]byte, error) {
	s := str(tok)
	switch d {
	case shmclient.F32, shmclient.F16, shmclient.BF16:
		f, err := strconv.ParseFloat(s, 32)
		if err != nil {
			return out, numError(tok, "a number")
		}
		switch d {
		case shmclient.F32:
			return binary.LittleEndian.AppendUint32(out, math.Float32bits(float32(f))), nil
		case shmclient.F16:
			return binary.LittleEndian.AppendUint16(out, shmclient.Float32ToFloat16(float32(f))), nil
		}
		return binary.LittleEndian.AppendUint16(out, shmclient.Float32ToBFloat16(float32(f))), nil
	case shmclient.F64:
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return out, numError(tok, "a number")
		}
		return binary.LittleEndian.AppendUint64(out, math.Float64bits(f)), nil
	case shmclient.Bool:
		switch s {
		case "true":
			return append(out, 1), nil
		case "false":
			return append(out, 0), nil
		}
		return out, numError(tok, "true or false")
	case shmclient.U8:
		v, err := strconv.ParseUint(s, 10, 8)
		if err != nil {
			return out, numError(tok, "an integer from 0 to 255")
		}
		return append(out, byte(v)), nil
	}
	bits := d.Size() * 8
	v, err := strconv.ParseInt(s, 10, bits)
	if err != nil {
		return out, numError(tok, "an integer of "+strconv.Itoa(bits)+" bits")
	}
	switch d {
	case shmclient.I8:
		return append(out, byte(v)), nil
	case shmclient.I16:
		return binary.LittleEndian.AppendUint16(out, uint16(v)), nil
	case shmclient.I32:
		return binary.LittleEndian.AppendUint32(out, uint32(v)), nil
	}
	return binary.LittleEndian.AppendUint64(out, uint64(v)), nil
}

func numError(tok []byte, want string) error {
	if len(tok) > 40 {
		tok = append(tok[:40:40], "..."...)
	}
	return badRequest("%s is not %s", tok, want)
}

// decodeJSONStrings parses a (nested) JSON array of n strings into tensord's BYTES layout.
func decodeJSONStrings(raw []byte, n int64, tensor string) ([]byte, error) {
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, badRequest("input %q: data is not valid JSON: %v", tensor, err)
	}
	var items [][]byte
	var flatten func(any) error
	flatten = func(v any) error {
		switch x := v.(type) {
		case []any:
			for _, e := range x {
				if err := flatten(e); err != nil {
					return err
				}
			}
		case string:
			items = append(items, []byte(x))
		default:
			return badRequest("input %q: BYTES data must be strings, not %T", tensor, v)
		}
		return nil
	}
	if _, ok := v.([]any); !ok {
		return nil, badRequest("input %q: data must be a JSON array", tensor)
	}
	if err := flatten(v); err != nil {
		return nil, err
	}
	if int64(len(items)) != n {
		return nil, badRequest("input %q: JSON data has %d strings, its shape has %d", tensor, len(items), n)
	}
	return bytesFromStrings(nil, items), nil
}

// appendJSONData appends t's elements as a flat JSON array. Floats are written in the
// shortest form that reads back to the same value; NaN and infinities, which JSON cannot
// write, become null.
func appendJSONData(b []byte, t shmclient.Tensor) ([]byte, error) {
	b = append(b, '[')
	data := t.Data
	size := t.DType.Size()
	if t.DType == shmclient.Bytes {
		items, err := t.ByteStrings()
		if err != nil {
			return b, err
		}
		for i, s := range items {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, s)
		}
		return append(b, ']'), nil
	}
	for i := 0; i+size <= len(data); i += size {
		if i > 0 {
			b = append(b, ',')
		}
		p := data[i:]
		switch t.DType {
		case shmclient.F32:
			b = appendFloat(b, float64(math.Float32frombits(binary.LittleEndian.Uint32(p))), 32)
		case shmclient.F64:
			b = appendFloat(b, math.Float64frombits(binary.LittleEndian.Uint64(p)), 64)
		case shmclient.F16:
			b = appendFloat(b, float64(shmclient.Float16ToFloat32(binary.LittleEndian.Uint16(p))), 32)
		case shmclient.BF16:
			b = appendFloat(b, float64(shmclient.BFloat16ToFloat32(binary.LittleEndian.Uint16(p))), 32)
		case shmclient.Bool:
			b = strconv.AppendBool(b, p[0] != 0)
		case shmclient.U8:
			b = strconv.AppendUint(b, uint64(p[0]), 10)
		case shmclient.I8:
			b = strconv.AppendInt(b, int64(int8(p[0])), 10)
		case shmclient.I16:
			b = strconv.AppendInt(b, int64(int16(binary.LittleEndian.Uint16(p))), 10)
		case shmclient.I32:
			b = strconv.AppendInt(b, int64(int32(binary.LittleEndian.Uint32(p))), 10)
		case shmclient.I64:
			b = strconv.AppendInt(b, int64(binary.LittleEndian.Uint64(p)), 10)
		}
	}
	return append(b, ']'), nil
}

func appendFloat(b []byte, f float64, bits int) []byte {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return append(b, "null"...)
	}
	return strconv.AppendFloat(b, f, 'g', -1, bits)
}

// appendJSONString appends s as a JSON string; bytes that are not UTF-8 become U+FFFD
// (binary data belongs in the binary extension).
func appendJSONString(b []byte, s []byte) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case c < 0x20:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&15])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRune(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, "\ufffd"...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}
