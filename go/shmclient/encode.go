package shmclient

import (
	"encoding/binary"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strings"
)

// The package's msgpack codec is hand-written, one codec for every message and descriptor:
// this file encodes, decode.go decodes (a generic tree and a binder onto the wire
// structs), and desc.go holds allocation-free specializations of both for the
// descriptors every request carries, built on the same primitives. Why not a library:
// input comes from another process, so no header may drive an allocation beyond the
// bytes behind it and map keys must be strings (SPEC §2.2); the encoding must be the
// canonical one of SPEC §2.3 byte for byte (the golden vectors, protocol/vectors, check
// every message both ways); and the per-request paths must not allocate at all. A
// generated codec (tinylib/msgp) would cover the struct paths but not the canonical
// shortest forms, the load config's arbitrary maps or the zero-allocation decode into
// reused slices, so those would stay hand-written beside it: two codecs again.
//
// Encoding rules (SPEC §2.3): integers in their shortest form (non-negative ones in the
// unsigned family), floats as float64 (float32 fields as float32), strings as str, []byte
// as bin, nil slices, maps and pointers as nil. A struct is a map of its msgpack-tagged
// fields in declaration order, which is the canonical key order; "omitempty" leaves a
// zero field out. A Go map is written with its keys sorted, an mpMap in its own order.

// marshal appends the canonical encoding of v to dst.
func marshal(dst []byte, v any) ([]byte, error) {
	out, err := appendValue(dst, reflect.ValueOf(v))
	if err != nil {
		return dst, fmt.Errorf("shmclient: encoding %T: %w", v, err)
	}
	return out, nil
}

// msgpackAppender is a type that encodes itself (the response descriptor, whose one key
// depends on which field is set).
type msgpackAppender interface {
	appendMsgpack(b []byte) ([]byte, error)
}

var appenderType = reflect.TypeOf((*msgpackAppender)(nil)).Elem()

func appendValue(b []byte, v reflect.Value) ([]byte, error) {
	if !v.IsValid() {
		return append(b, 0xc0), nil
	}
	if v.Type().Implements(appenderType) && (v.Kind() != reflect.Pointer || !v.IsNil()) {
		return v.Interface().(msgpackAppender).appendMsgpack(b)
	}
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if v.IsNil() {
			return append(b, 0xc0), nil
		}
		return appendValue(b, v.Elem())
	case reflect.Bool:
		if v.Bool() {
			return append(b, 0xc3), nil
		}
		return append(b, 0xc2), nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return appendUint(b, v.Uint()), nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return appendInt(b, v.Int()), nil
	case reflect.Float32:
		return binary.BigEndian.AppendUint32(append(b, 0xca), math.Float32bits(float32(v.Float()))), nil
	case reflect.Float64:
		return binary.BigEndian.AppendUint64(append(b, 0xcb), math.Float64bits(v.Float())), nil
	case reflect.String:
		return appendStr(b, v.String()), nil
	case reflect.Slice, reflect.Array:
		if v.Kind() == reflect.Slice && v.IsNil() {
			return append(b, 0xc0), nil
		}
		if v.Type().Elem().Kind() == reflect.Uint8 {
			return appendBin(b, v.Bytes()), nil
		}
		if v.Type() == mpMapType {
			return appendMpMap(b, v.Interface().(mpMap))
		}
		b = appendArrayHeader(b, v.Len())
		for i := 0; i < v.Len(); i++ {
			var err error
			if b, err = appendValue(b, v.Index(i)); err != nil {
				return b, err
			}
		}
		return b, nil
	case reflect.Map:
		if v.IsNil() {
			return append(b, 0xc0), nil
		}
		if v.Type().Key().Kind() != reflect.String {
			return b, fmt.Errorf("map keys must be strings, not %s", v.Type().Key())
		}
		keys := v.MapKeys()
		sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
		b = appendMapHeader(b, len(keys))
		for _, k := range keys {
			b = appendStr(b, k.String())
			var err error
			if b, err = appendValue(b, v.MapIndex(k)); err != nil {
				return b, err
			}
		}
		return b, nil
	case reflect.Struct:
		return appendStruct(b, v)
	}
	return b, fmt.Errorf("cannot encode %s", v.Type())
}

func appendMpMap(b []byte, m mpMap) ([]byte, error) {
	b = appendMapHeader(b, len(m))
	for _, kv := range m {
		b = appendStr(b, kv.Key)
		var err error
		if b, err = appendValue(b, reflect.ValueOf(kv.Value)); err != nil {
			return b, err
		}
	}
	return b, nil
}

func appendStruct(b []byte, v reflect.Value) ([]byte, error) {
	t := v.Type()
	fields := make([]int, 0, t.NumField())
	names := make([]string, 0, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("msgpack")
		if tag == "-" || tag == "" || !f.IsExported() {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if strings.Contains(opts, "omitempty") && v.Field(i).IsZero() {
			continue
		}
		fields = append(fields, i)
		names = append(names, name)
	}
	b = appendMapHeader(b, len(fields))
	for j, i := range fields {
		b = appendStr(b, names[j])
		var err error
		if b, err = appendValue(b, v.Field(i)); err != nil {
			return b, fmt.Errorf("%s: %w", names[j], err)
		}
	}
	return b, nil
}

// The shortest forms of SPEC §2.3. The *Len functions give the encoded size without
// encoding, so that a record can be laid out before its descriptor is written.

func uintLen(v uint64) int {
	switch {
	case v <= 0x7f:
		return 1
	case v <= math.MaxUint8:
		return 2
	case v <= math.MaxUint16:
		return 3
	case v <= math.MaxUint32:
		return 5
	}
	return 9
}

func appendUint(b []byte, v uint64) []byte {
	switch {
	case v <= 0x7f:
		return append(b, byte(v))
	case v <= math.MaxUint8:
		return append(b, 0xcc, byte(v))
	case v <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, 0xcd), uint16(v))
	case v <= math.MaxUint32:
		return binary.BigEndian.AppendUint32(append(b, 0xce), uint32(v))
	}
	return binary.BigEndian.AppendUint64(append(b, 0xcf), v)
}

func strLen(s string) int {
	switch n := len(s); {
	case n < 32:
		return 1 + n
	case n <= math.MaxUint8:
		return 2 + n
	case n <= math.MaxUint16:
		return 3 + n
	default:
		return 5 + n
	}
}

func appendStr(b []byte, s string) []byte {
	return append(appendHeader(b, len(s), 0xa0, 31, 0xd9, 0xda, 0xdb), s...)
}

func arrayHeaderLen(n int) int {
	switch {
	case n < 16:
		return 1
	case n <= math.MaxUint16:
		return 3
	}
	return 5
}

func appendArrayHeader(b []byte, n int) []byte {
	return appendHeader(b, n, 0x90, 15, 0, 0xdc, 0xdd)
}

func appendInt(b []byte, v int64) []byte {
	switch {
	case v >= 0:
		return appendUint(b, uint64(v))
	case v >= -32:
		return append(b, byte(int8(v)))
	case v >= math.MinInt8:
		return append(b, 0xd0, byte(int8(v)))
	case v >= math.MinInt16:
		return binary.BigEndian.AppendUint16(append(b, 0xd1), uint16(int16(v)))
	case v >= math.MinInt32:
		return binary.BigEndian.AppendUint32(append(b, 0xd2), uint32(int32(v)))
	}
	return binary.BigEndian.AppendUint64(append(b, 0xd3), uint64(v))
}

func appendBin(b []byte, p []byte) []byte {
	return append(appendHeader(b, len(p), 0, -1, 0xc4, 0xc5, 0xc6), p...)
}

func appendMapHeader(b []byte, n int) []byte {
	return appendHeader(b, n, 0x80, 15, 0, 0xde, 0xdf)
}

// appendHeader appends the shortest header for n items or bytes of one msgpack family: the
// fix form (fix|n) while n <= fixMax, else the 8-bit form (when the family has one: code8
// not 0), the 16-bit or the 32-bit one.
func appendHeader(b []byte, n int, fix byte, fixMax int, code8, code16, code32 byte) []byte {
	switch {
	case n <= fixMax:
		return append(b, fix|byte(n))
	case code8 != 0 && n <= math.MaxUint8:
		return append(b, code8, byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, code16), uint16(n))
	}
	return binary.BigEndian.AppendUint32(append(b, code32), uint32(n))
}
