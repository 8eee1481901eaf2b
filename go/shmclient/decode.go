package shmclient

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
)

// The decoding half of the package's msgpack codec (encode.go says why it is
// hand-written): input comes from another process (frames, and descriptors in shared
// memory), so array and map headers must never drive an allocation larger than the bytes
// that back them, keys must be strings (SPEC §2.2) and map order must survive for the
// golden-vector comparison.

// mpMap is a decoded msgpack map with its keys in wire order.
type mpMap []mpKV

type mpKV struct {
	Key   string
	Value any
}

func (m mpMap) get(key string) (any, bool) {
	for _, kv := range m {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return nil, false
}

const maxDecodeDepth = 32

var errShortBuffer = errors.New("truncated msgpack")

type mpDecoder struct {
	b   []byte
	pos int
}

// decodeMsgpack decodes exactly one value spanning all of b. Values are nil, bool,
// int64 (negative integers), uint64 (non-negative integers), float64, string, []byte,
// []any and mpMap.
func decodeMsgpack(b []byte) (any, error) {
	d := mpDecoder{b: b}
	v, err := d.value(0)
	if err != nil {
		return nil, err
	}
	if d.pos != len(b) {
		return nil, fmt.Errorf("%d trailing bytes after msgpack value", len(b)-d.pos)
	}
	return v, nil
}

func (d *mpDecoder) take(n int) ([]byte, error) {
	if n < 0 || n > len(d.b)-d.pos {
		return nil, errShortBuffer
	}
	s := d.b[d.pos : d.pos+n]
	d.pos += n
	return s, nil
}

func (d *mpDecoder) uint(n int) (uint64, error) {
	s, err := d.take(n)
	if err != nil {
		return 0, err
	}
	switch n {
	case 1:
		return uint64(s[0]), nil
	case 2:
		return uint64(binary.BigEndian.Uint16(s)), nil
	case 4:
		return uint64(binary.BigEndian.Uint32(s)), nil
	}
	return binary.BigEndian.Uint64(s), nil
}

func (d *mpDecoder) value(depth int) (any, error) {
	if depth > maxDecodeDepth {
		return nil, fmt.Errorf("msgpack nesting deeper than %d", maxDecodeDepth)
	}
	cs, err := d.take(1)
	if err != nil {
		return nil, err
	}
	c := cs[0]
	switch {
	case c <= 0x7f:
		return uint64(c), nil
	case c >= 0xe0:
		return int64(int8(c)), nil
	case c&0xf0 == 0x80:
		return d.mapBody(int(c&0x0f), depth)
	case c&0xf0 == 0x90:
		return d.arrayBody(int(c&0x0f), depth)
	case c&0xe0 == 0xa0:
		return d.str(int(c & 0x1f))
	}
	switch c {
	case 0xc0:
		return nil, nil
	case 0xc2:
		return false, nil
	case 0xc3:
		return true, nil
	case 0xc4, 0xc5, 0xc6:
		n, err := d.uint(1 << (c - 0xc4))
		if err != nil {
			return nil, err
		}
		s, err := d.take(int(min(n, math.MaxInt32)))
		if err != nil {
			return nil, err
		}
		return append([]byte(nil), s...), nil
	case 0xca:
		u, err := d.uint(4)
		return float64(math.Float32frombits(uint32(u))), err
	case 0xcb:
		u, err := d.uint(8)
		return math.Float64frombits(u), err
	case 0xcc, 0xcd, 0xce, 0xcf:
		return d.uint(1 << (c - 0xcc))
	case 0xd0, 0xd1, 0xd2, 0xd3:
		n := 1 << (c - 0xd0)
		u, err := d.uint(n)
		if err != nil {
			return nil, err
		}
		// Sign-extend from the encoded width.
		shift := 64 - 8*uint(n)
		v := int64(u<<shift) >> shift
		if v >= 0 {
			return uint64(v), nil
		}
		return v, nil
	case 0xd9, 0xda, 0xdb:
		n, err := d.uint(1 << (c - 0xd9))
		if err != nil {
			return nil, err
		}
		return d.str(int(min(n, math.MaxInt32)))
	case 0xdc, 0xdd:
		n, err := d.uint(2 << (c - 0xdc))
		if err != nil {
			return nil, err
		}
		return d.arrayBody(int(min(n, math.MaxInt32)), depth)
	case 0xde, 0xdf:
		n, err := d.uint(2 << (c - 0xde))
		if err != nil {
			return nil, err
		}
		return d.mapBody(int(min(n, math.MaxInt32)), depth)
	}
	return nil, fmt.Errorf("unsupported msgpack type byte 0x%02x", c)
}

func (d *mpDecoder) str(n int) (string, error) {
	s, err := d.take(n)
	if err != nil {
		return "", err
	}
	return string(s), nil
}

func (d *mpDecoder) arrayBody(n int, depth int) ([]any, error) {
	// Every element takes at least one byte: a header claiming more is a lie.
	if n > len(d.b)-d.pos {
		return nil, errShortBuffer
	}
	out := make([]any, n)
	for i := range out {
		v, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		out[i] = v
	}
	return out, nil
}

func (d *mpDecoder) mapBody(n int, depth int) (mpMap, error) {
	if n > (len(d.b)-d.pos)/2 {
		return nil, errShortBuffer
	}
	out := make(mpMap, n)
	for i := range out {
		k, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		ks, ok := k.(string)
		if !ok {
			return nil, fmt.Errorf("map key of type %s, keys must be strings", typeName(k))
		}
		v, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		out[i] = mpKV{ks, v}
	}
	return out, nil
}

func typeName(v any) string {
	switch v.(type) {
	case nil:
		return "nil"
	case bool:
		return "bool"
	case int64, uint64:
		return "integer"
	case float64:
		return "float"
	case string:
		return "string"
	case []byte:
		return "binary"
	case []any:
		return "array"
	case mpMap:
		return "map"
	}
	return fmt.Sprintf("%T", v)
}

// fromTree fills dst (a pointer) from a decoded value, checking every type like the
// Python side's from_wire: struct fields are matched by msgpack tag, a missing field is
// an error unless its tag says omitempty, unknown keys are ignored. Slices accept nil
// (leaving them nil, which is how "shape: nil" survives).
func fromTree(v any, dst any, what string) error {
	return assign(v, reflect.ValueOf(dst).Elem(), what)
}

var mpMapType = reflect.TypeOf(mpMap(nil))

func assign(v any, dst reflect.Value, what string) error {
	mismatch := func(want string) error {
		return fmt.Errorf("%s: expected %s, got %s", what, want, typeName(v))
	}
	if dst.Type() == mpMapType {
		m, ok := v.(mpMap)
		if !ok {
			return mismatch("a map")
		}
		dst.Set(reflect.ValueOf(m))
		return nil
	}
	switch dst.Kind() {
	case reflect.Pointer:
		if v == nil {
			dst.SetZero()
			return nil
		}
		p := reflect.New(dst.Type().Elem())
		if err := assign(v, p.Elem(), what); err != nil {
			return err
		}
		dst.Set(p)
	case reflect.Interface:
		if v != nil {
			dst.Set(reflect.ValueOf(v))
		}
	case reflect.String:
		s, ok := v.(string)
		if !ok {
			return mismatch("a string")
		}
		dst.SetString(s)
	case reflect.Bool:
		b, ok := v.(bool)
		if !ok {
			return mismatch("a bool")
		}
		dst.SetBool(b)
	case reflect.Uint64, reflect.Uint32:
		u, ok := v.(uint64)
		if !ok {
			return mismatch("a non-negative integer")
		}
		if dst.OverflowUint(u) {
			return fmt.Errorf("%s: %d is out of range", what, u)
		}
		dst.SetUint(u)
	case reflect.Int64:
		switch n := v.(type) {
		case int64:
			dst.SetInt(n)
		case uint64:
			if n > math.MaxInt64 {
				return fmt.Errorf("%s: %d is out of range", what, n)
			}
			dst.SetInt(int64(n))
		default:
			return mismatch("an integer")
		}
	case reflect.Slice:
		if v == nil {
			dst.SetZero()
			return nil
		}
		if dst.Type().Elem().Kind() == reflect.Uint8 {
			b, ok := v.([]byte)
			if !ok {
				return mismatch("binary")
			}
			dst.SetBytes(b)
			return nil
		}
		a, ok := v.([]any)
		if !ok {
			return mismatch("an array")
		}
		s := reflect.MakeSlice(dst.Type(), len(a), len(a))
		for i, e := range a {
			if err := assign(e, s.Index(i), fmt.Sprintf("%s[%d]", what, i)); err != nil {
				return err
			}
		}
		dst.Set(s)
	case reflect.Struct:
		m, ok := v.(mpMap)
		if !ok {
			return mismatch("a map")
		}
		t := dst.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			tag := f.Tag.Get("msgpack")
			if tag == "-" || !f.IsExported() {
				continue
			}
			name, opts, _ := strings.Cut(tag, ",")
			fv, present := m.get(name)
			if !present {
				if strings.Contains(opts, "omitempty") {
					continue
				}
				return fmt.Errorf("%s: missing field %q", what, name)
			}
			if err := assign(fv, dst.Field(i), what+"."+name); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("%s: cannot decode into %s", what, dst.Type())
	}
	return nil
}
