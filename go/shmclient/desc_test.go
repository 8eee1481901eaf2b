package shmclient

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"
)

// The specialized descriptor codecs of desc.go against the general paths of the same codec
// (marshal; decodeMsgpack plus fromTree), which the golden vectors pin to the SPEC.

// Values on either side of every msgpack width boundary.
var (
	boundaryUints = []uint64{0, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000, math.MaxUint32, math.MaxUint32 + 1, math.MaxUint64}
	boundaryLens  = []int{0, 1, 31, 32, 255, 256, 65535, 65536}
)

func requestDescCases() []requestDesc {
	var cases []requestDesc
	for _, n := range boundaryLens {
		s := strings.Repeat("m", n)
		cases = append(cases,
			requestDesc{Model: s, Inputs: []tensorRef{}},
			requestDesc{Model: "m", Inputs: []tensorRef{{Name: s, DType: "f32", Shape: []uint64{}}}},
			requestDesc{Model: "m", Inputs: []tensorRef{{Name: "x", DType: s, Shape: []uint64{1}}}},
		)
	}
	for _, u := range boundaryUints {
		cases = append(cases, requestDesc{Model: "identity", TimeoutUS: u, Inputs: []tensorRef{
			{Name: "x", DType: "u8", Shape: []uint64{u, 2, u}, Offset: u, NBytes: u},
		}})
	}
	for _, n := range []int{0, 1, 15, 16, 17, 300, 65536} {
		shape := make([]uint64, n)
		for i := range shape {
			shape[i] = boundaryUints[i%len(boundaryUints)]
		}
		inputs := make([]tensorRef, n)
		for i := range inputs {
			inputs[i] = tensorRef{Name: fmt.Sprint("in", i), DType: "bf16", Shape: []uint64{uint64(i)}, Offset: 64 * uint64(i), NBytes: 2 * uint64(i)}
		}
		cases = append(cases,
			requestDesc{Model: "rank", Inputs: []tensorRef{{Name: "x", DType: "f64", Shape: shape}}},
			requestDesc{Model: "many", Inputs: inputs},
		)
	}
	return cases
}

func TestRequestDescEncoderMatchesGeneral(t *testing.T) {
	for i, d := range requestDescCases() {
		want, err := marshal(nil, &d)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendRequestDesc(nil, &d); !bytes.Equal(got, want) {
			t.Errorf("case %d: appendRequestDesc differs from the general encoder\n got %.200x\nwant %.200x", i, got, want)
		}
		if n := requestDescLen(&d); n != len(want) {
			t.Errorf("case %d: requestDescLen %d, encoding is %d bytes", i, n, len(want))
		}
		// Appending keeps what is already there and writes in place when there is room,
		// which is how Send writes into the record.
		buf := make([]byte, 3, 3+len(want))
		copy(buf, "abc")
		got := appendRequestDesc(buf, &d)
		if !bytes.Equal(got[:3], []byte("abc")) || !bytes.Equal(got[3:], want) || &got[0] != &buf[0] {
			t.Errorf("case %d: appending to a prefix with room went wrong", i)
		}
	}
}

// responseDescCases are successful response descriptors in canonical form: the fast path
// must take every one of them.
func responseDescCases() []responseDesc {
	cases := []responseDesc{{Outputs: []tensorRef{}}}
	for _, n := range boundaryLens {
		s := strings.Repeat("y", n)
		cases = append(cases,
			responseDesc{Outputs: []tensorRef{{Name: s, DType: "f32", Shape: []uint64{}, Offset: 64, NBytes: 0}}},
			responseDesc{Outputs: []tensorRef{{Name: "y", DType: s, Shape: []uint64{2}, Offset: 64, NBytes: 8}}},
		)
	}
	for _, u := range boundaryUints {
		cases = append(cases, responseDesc{Outputs: []tensorRef{{Name: "y", DType: "u8", Shape: []uint64{u, u}, Offset: u, NBytes: u}}})
	}
	for _, n := range []int{1, 15, 16, 17, maxTensors} {
		outs := make([]tensorRef, n)
		for i := range outs {
			shape := make([]uint64, i%18)
			for j := range shape {
				shape[j] = uint64(j)
			}
			outs[i] = tensorRef{Name: fmt.Sprint("out", i), DType: dtypeNames[1+i%11], Shape: shape, Offset: 64 * uint64(i+1), NBytes: uint64(i)}
		}
		cases = append(cases, responseDesc{Outputs: outs})
	}
	return cases
}

// checkSameDecode fails unless decodeResponseDesc (fast path first) and the general
// decoder agree on b: the same descriptor, or errors with the same text.
func checkSameDecode(t *testing.T, b []byte) {
	t.Helper()
	d, err := decodeResponseDesc(b)
	g, gerr := decodeResponseDescGeneral(b)
	if fmt.Sprint(err) != fmt.Sprint(gerr) || !reflect.DeepEqual(d, g) {
		t.Fatalf("decoding %.200x\n fast path: %+v, %v\n general:   %+v, %v", b, d, err, g, gerr)
	}
}

func TestResponseDescFastPath(t *testing.T) {
	for i, d := range responseDescCases() {
		b, err := marshal(nil, &d)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := decodeResponseOutputs(b); !ok {
			t.Errorf("case %d: the fast path declined a canonical descriptor %.200x", i, b)
		}
		checkSameDecode(t, b)
		// Truncations (every one for small descriptors, a sample of the large) and a
		// trailing byte: declined, and the same error.
		step := max(1, len(b)/1024)
		for n := 0; n < len(b); n += step {
			if _, ok := decodeResponseOutputs(b[:n]); ok {
				t.Fatalf("case %d: the fast path took %d of %d bytes", i, n, len(b))
			}
			checkSameDecode(t, b[:n])
		}
		checkSameDecode(t, append(b[:len(b):len(b)], 0))
	}
}

func TestResponseDescFastPathVariants(t *testing.T) {
	str := func(s string) string { return hex.EncodeToString(appendStr(nil, s)) }
	key := func(k string) string { return str(k) }
	// One output {name: "y", dtype: "f32", shape: [2], offset: 64, nbytes: 8}, written
	// piece by piece so each variant changes one thing.
	ref := func(header, name, shape, offset string) string {
		return header + key("name") + name + key("dtype") + str("f32") + key("shape") + shape + key("offset") + offset + key("nbytes") + "08"
	}
	canonRef := ref("85", str("y"), "9102", "40")
	outputs := func(arrayHeader string, refs ...string) string {
		return "81" + key("outputs") + arrayHeader + strings.Join(refs, "")
	}
	for _, c := range []struct {
		name string
		hex  string
		fast bool // whether the fast path should take it
	}{
		{"canonical", outputs("91", canonRef), true},
		{"wide map and array headers", "de0001" + key("outputs") + "dc0001" + ref("df00000005", str("y"), "dd0000000102", "40"), true},
		{"wide strings and ints", outputs("91", ref("85", "d90179", "91cf0000000000000002", "cd0040")), true},
		{"signed non-negative int", outputs("91", ref("85", str("y"), "91d002", "40")), false},
		{"negative dimension", outputs("91", ref("85", str("y"), "91ff", "40")), false},
		{"nil shape", outputs("91", ref("85", str("y"), "c0", "40")), false},
		{"name as bin", outputs("91", ref("85", "c40179", "9102", "40")), false},
		{"nil outputs", "81" + key("outputs") + "c0", false},
		{"error", "81" + key("error") + "83" + key("code") + "0c" + key("name") + str("DEADLINE") + key("message") + str("late"), false},
		{"nil error", "81" + key("error") + "c0", false},
		{"two keys", "82" + key("outputs") + "90" + key("error") + "c0", false},
		{"other key", "81" + key("output") + "90", false},
		{"extra ref key", outputs("91", "86"+canonRef[2:]+key("extra")+"01"), false},
		{"missing ref key", outputs("91", "84"+key("name")+str("y")+key("dtype")+str("f32")+key("shape")+"90"+key("offset")+"40"), false},
		{"reordered ref keys", outputs("91", "85"+key("dtype")+str("f32")+key("name")+str("y")+key("shape")+"9102"+key("offset")+"40"+key("nbytes")+"08"), false},
		{"array count lies", outputs("dd7fffffff", canonRef), false},
		{"shape count lies", outputs("91", ref("85", str("y"), "dd7fffffff02", "40")), false},
		{"string length lies", outputs("91", ref("85", "db7fffffff79", "9102", "40")), false},
		{"not a map", "90", false},
		{"empty", "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			b, err := hex.DecodeString(c.hex)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := decodeResponseOutputs(b); ok != c.fast {
				t.Errorf("fast path took it: %v, want %v", ok, c.fast)
			}
			checkSameDecode(t, b)
		})
	}
}

func TestInternDType(t *testing.T) {
	for _, name := range dtypeNames {
		if got := internDType([]byte(name)); got != name {
			t.Errorf("internDType(%q) = %q", name, got)
		}
	}
	if got := internDType([]byte("f128")); got != "f128" {
		t.Errorf("internDType(f128) = %q", got)
	}
	if n := testing.AllocsPerRun(100, func() { internDType([]byte("f32")) }); n != 0 {
		t.Errorf("internDType of a known name allocates %v times", n)
	}
}

// FuzzResponseDesc: the fast path never changes what decodeResponseDesc returns.
//
//	go test -run '^$' -fuzz FuzzResponseDesc ./shmclient
func FuzzResponseDesc(f *testing.F) {
	for _, d := range responseDescCases()[:20] {
		b, err := marshal(nil, &d)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { checkSameDecode(t, b) })
}

// FuzzRequestDesc: the hand-written encoder and its length agree with the general
// encoder on arbitrary field values.
//
//	go test -run '^$' -fuzz FuzzRequestDesc ./shmclient
func FuzzRequestDesc(f *testing.F) {
	f.Add("identity", uint64(0), "x", "u8", []byte{16, 0}, uint64(64), uint64(4096), uint8(1))
	f.Add(strings.Repeat("m", 40), uint64(math.MaxUint64), strings.Repeat("n", 300), "f32", []byte{1, 2, 3, 4, 5, 6, 7, 8, 9}, uint64(1<<40), uint64(300), uint8(20))
	f.Fuzz(func(t *testing.T, model string, timeout uint64, name, dtype string, dims []byte, offset, nbytes uint64, inputs uint8) {
		shape := []uint64{}
		for len(dims) >= 2 {
			// Two bytes per dimension: a width and a value, to reach every int form.
			shape = append(shape, binary.LittleEndian.Uint64(append(bytes.Repeat([]byte{dims[1]}, int(dims[0]%9)), make([]byte, 8)...)))
			dims = dims[2:]
		}
		d := requestDesc{Model: model, TimeoutUS: timeout, Inputs: make([]tensorRef, int(inputs))}
		for i := range d.Inputs {
			d.Inputs[i] = tensorRef{Name: name, DType: dtype, Shape: shape, Offset: offset + uint64(i), NBytes: nbytes}
		}
		want, err := marshal(nil, &d)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendRequestDesc(nil, &d); !bytes.Equal(got, want) {
			t.Fatalf("appendRequestDesc\n got %x\nwant %x", got, want)
		}
		if n := requestDescLen(&d); n != len(want) {
			t.Fatalf("requestDescLen %d, encoding is %d bytes", n, len(want))
		}
	})
}

// The codecs' cost per request, against the general machinery they replace:
//
//	go test -run '^$' -bench 'Desc' -benchmem ./shmclient
func BenchmarkRequestDesc(b *testing.B) {
	d := requestDesc{Model: "identity", TimeoutUS: 59999871, Inputs: []tensorRef{{Name: "x", DType: "u8", Shape: []uint64{4096}, Offset: 128, NBytes: 4096}}}
	b.Run("hand-written", func(b *testing.B) {
		buf := make([]byte, 0, 256)
		for b.Loop() {
			buf = appendRequestDesc(buf[:0], &d)
			_ = requestDescLen(&d)
		}
	})
	b.Run("general", func(b *testing.B) {
		for b.Loop() {
			if _, err := marshal(nil, &d); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkResponseDesc(b *testing.B) {
	d := responseDesc{Outputs: []tensorRef{{Name: "y", DType: "u8", Shape: []uint64{4096}, Offset: 128, NBytes: 4096}}}
	enc, err := marshal(nil, &d)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("fast path", func(b *testing.B) {
		for b.Loop() {
			if _, err := decodeResponseDesc(enc); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("general", func(b *testing.B) {
		for b.Loop() {
			if _, err := decodeResponseDescGeneral(enc); err != nil {
				b.Fatal(err)
			}
		}
	})
}
