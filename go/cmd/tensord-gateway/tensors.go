package main

import (
	"encoding/binary"
	"strings"

	"github.com/tensord/tensord/go/shmclient"
)

// Tensors between the Open Inference Protocol and tensord: datatype names, and BYTES
// elements, which the protocol's binary forms (the HTTP binary extension and gRPC raw
// contents) write as a 4-byte little-endian length before each element while tensord
// (SPEC §5) writes every length first and then the bytes.

var datatypes = map[shmclient.DType]string{
	shmclient.Bool: "BOOL", shmclient.U8: "UINT8", shmclient.I8: "INT8", shmclient.I16: "INT16",
	shmclient.I32: "INT32", shmclient.I64: "INT64", shmclient.F16: "FP16", shmclient.BF16: "BF16",
	shmclient.F32: "FP32", shmclient.F64: "FP64", shmclient.Bytes: "BYTES",
}

var dtypes = func() map[string]shmclient.DType {
	m := make(map[string]shmclient.DType, len(datatypes))
	for d, s := range datatypes {
		m[s] = d
	}
	return m
}()

// datatypeName is the protocol's name for d; "ANY" for a model input that takes any dtype.
func datatypeName(d shmclient.DType) string {
	if s, ok := datatypes[d]; ok {
		return s
	}
	return "ANY"
}

func parseDatatype(tensor, s string) (shmclient.DType, error) {
	if d, ok := dtypes[s]; ok {
		return d, nil
	}
	if strings.HasPrefix(s, "UINT") {
		return 0, badRequest("input %q: datatype %s: tensord carries UINT8 and signed integers, not %s", tensor, s, s)
	}
	return 0, badRequest("input %q: unknown datatype %q (BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64, BYTES)", tensor, s)
}

// numElements multiplies a request's shape, refusing negative dimensions and overflow.
func numElements(tensor string, shape []int64) (int64, error) {
	if len(shape) > 16 {
		return 0, badRequest("input %q: rank %d, tensord takes at most 16", tensor, len(shape))
	}
	n := int64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, badRequest("input %q: shape %v has a negative dimension", tensor, shape)
		}
		if d != 0 && n > (1<<50)/d {
			return 0, badRequest("input %q: shape %v is too large", tensor, shape)
		}
		n *= d
	}
	return n, nil
}

// bytesFromPrefixed turns n length-prefixed elements (the protocol's binary BYTES form)
// into tensord's layout, appended to dst.
func bytesFromPrefixed(dst, src []byte, n int64, tensor string) ([]byte, error) {
	if n > int64(len(src))/4 {
		return dst, badRequest("input %q: %d bytes of BYTES data cannot hold %d elements", tensor, len(src), n)
	}
	start := len(dst)
	dst = append(dst, make([]byte, 4*n)...)
	pos := 0
	for i := int64(0); i < n; i++ {
		if len(src)-pos < 4 {
			return dst, badRequest("input %q: BYTES element %d has no length", tensor, i)
		}
		l := int(binary.LittleEndian.Uint32(src[pos:]))
		pos += 4
		if l > len(src)-pos {
			return dst, badRequest("input %q: BYTES element %d of %d bytes runs past the data", tensor, i, l)
		}
		binary.LittleEndian.PutUint32(dst[start+4*int(i):], uint32(l))
		dst = append(dst, src[pos:pos+l]...)
		pos += l
	}
	if pos != len(src) {
		return dst, badRequest("input %q: %d bytes of BYTES data, %d elements use %d", tensor, len(src), n, pos)
	}
	return dst, nil
}

// bytesFromStrings is tensord's layout of items, appended to dst.
func bytesFromStrings(dst []byte, items [][]byte) []byte {
	for _, s := range items {
		dst = binary.LittleEndian.AppendUint32(dst, uint32(len(s)))
	}
	for _, s := range items {
		dst = append(dst, s...)
	}
	return dst
}

// appendPrefixed appends a tensord BYTES tensor in the protocol's length-prefixed form.
func appendPrefixed(dst []byte, t shmclient.Tensor) ([]byte, error) {
	items, err := t.ByteStrings()
	if err != nil {
		return dst, err
	}
	for _, s := range items {
		dst = binary.LittleEndian.AppendUint32(dst, uint32(len(s)))
		dst = append(dst, s...)
	}
	return dst, nil
}
