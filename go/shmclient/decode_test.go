package shmclient

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestDecodeRejects(t *testing.T) {
	for name, b := range map[string][]byte{
		"empty":          {},
		"trailing":       {0x80, 0x00},
		"truncated str":  {0xa5, 'a'},
		"int key":        {0x81, 0x01, 0x02},
		"huge array32":   {0xdd, 0xff, 0xff, 0xff, 0xff},
		"huge map32":     {0xdf, 0x7f, 0xff, 0xff, 0xff, 0xa1, 'a', 0x01},
		"huge bin32":     {0xc6, 0xff, 0xff, 0xff, 0xff},
		"reserved 0xc1":  {0xc1},
		"ext":            {0xd4, 0x01, 0x00},
		"deep":           append(bytes.Repeat([]byte{0x91}, 100), 0x01),
		"truncated uint": {0xcf, 0x01},
	} {
		if _, err := decodeMsgpack(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestDecodeIntWidths(t *testing.T) {
	for _, tc := range []struct {
		b    []byte
		want any
	}{
		{[]byte{0x05}, uint64(5)},
		{[]byte{0xcc, 0xff}, uint64(255)},
		{[]byte{0xcd, 0x01, 0x00}, uint64(256)},
		{[]byte{0xce, 0, 0, 0, 7}, uint64(7)},
		{[]byte{0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, uint64(math.MaxUint64)},
		{[]byte{0xff}, int64(-1)},
		{[]byte{0xd0, 0x80}, int64(-128)},
		{[]byte{0xd0, 0x05}, uint64(5)}, // non-negative int8 is still a uint
		{[]byte{0xd1, 0xff, 0x00}, int64(-256)},
		{[]byte{0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0}, int64(math.MinInt64)},
	} {
		got, err := decodeMsgpack(tc.b)
		if err != nil || got != tc.want {
			t.Errorf("%x: got %#v, %v; want %#v", tc.b, got, err, tc.want)
		}
	}
}

func frameOf(body []byte) []byte {
	f := binary.LittleEndian.AppendUint32(nil, uint32(len(body)))
	return append(f, body...)
}

func TestDecodeMessageErrors(t *testing.T) {
	enc := func(v any) []byte {
		b, err := marshal(nil, v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for name, body := range map[string][]byte{
		"not a map":    enc([]any{"type"}),
		"no type":      enc(map[string]any{"id": 1}),
		"type not str": enc(map[string]any{"type": 3}),
		"unknown type": enc(map[string]any{"type": "nope"}),
		"missing id":   enc(map[string]any{"type": "pong"}),
		"negative id":  enc(map[string]any{"type": "pong", "id": -1}),
		"id as str":    enc(map[string]any{"type": "pong", "id": "1"}),
		"bad fatal":    enc(map[string]any{"type": "error", "id": 0, "code": 1, "name": "X", "message": "m", "fatal": 1}),
	} {
		_, _, err := decodeMessage(body)
		if !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: got %v, want ErrProtocol", name, err)
		}
	}
	for name, f := range map[string][]byte{
		"zero length": {0, 0, 0, 0},
		"too long":    {0x01, 0x00, 0x10, 0x00},
	} {
		if _, err := readFrame(bytes.NewReader(f), maxFrame); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: got %v, want ErrProtocol", name, err)
		}
	}
	if _, err := readFrame(bytes.NewReader(frameOf([]byte{0x80})[:4]), maxFrame); err == nil {
		t.Error("truncated body accepted")
	}
}

// TestDecodeNoPanic feeds random mutations of valid messages to the decoders: errors are
// fine, panics and huge allocations are not.
func TestDecodeNoPanic(t *testing.T) {
	var seeds [][]byte
	for _, c := range loadVectors(t) {
		b := mustHex(t, c.Hex)
		if c.Kind == "frame" {
			b = b[4:]
		}
		if c.Kind != "record_header" {
			seeds = append(seeds, b)
		}
	}
	rng := rand.New(rand.NewPCG(9, 9))
	for i := 0; i < 20000; i++ {
		b := append([]byte(nil), seeds[rng.IntN(len(seeds))]...)
		for j := rng.IntN(4); j >= 0; j-- {
			switch rng.IntN(3) {
			case 0:
				b[rng.IntN(len(b))] = byte(rng.Uint32())
			case 1:
				b = b[:rng.IntN(len(b))+1]
			case 2:
				p := rng.IntN(len(b))
				b = append(b[:p], append([]byte{byte(rng.Uint32())}, b[p:]...)...)
			}
		}
		decodeMessage(b)
		decodeRequestDesc(b)
		decodeResponseDesc(b)
	}
}

func TestPlanRecord(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	for i := 0; i < 500; i++ {
		n := rng.IntN(6)
		specs := make([]TensorSpec, n)
		for j := range specs {
			shape := make([]int64, rng.IntN(4))
			for k := range shape {
				shape[k] = int64(rng.IntN(300))
			}
			dt := DType(1 + rng.IntN(int(Bool)))
			specs[j] = TensorSpec{Name: strings.Repeat("n", 1+rng.IntN(40)) + string(rune('a'+j)), DType: dt, Shape: shape}
		}
		desc, start, recLen, err := planRecord(strings.Repeat("m", 1+rng.IntN(200)), specs)
		if err != nil {
			t.Fatal(err)
		}
		if recLen%64 != 0 || start%64 != 0 || recLen < start {
			t.Fatalf("layout start %d len %d", start, recLen)
		}
		// The descriptor fits for every timeout, up to the longest encoding.
		for _, to := range []uint64{0, 1, 1 << 20, math.MaxUint64} {
			desc.TimeoutUS = to
			enc, _ := marshal(nil, &desc)
			if recordHeaderSize+uint64(len(enc)) > start {
				t.Fatalf("descriptor of %d bytes overlaps data at %d", len(enc), start)
			}
		}
		end := start
		for _, ref := range desc.Inputs {
			if ref.Offset%64 != 0 || ref.Offset < end || ref.Offset+ref.NBytes > recLen {
				t.Fatalf("tensor at %d+%d in record of %d (previous end %d)", ref.Offset, ref.NBytes, recLen, end)
			}
			end = ref.Offset + ref.NBytes
		}
	}
}

func TestDaemonErrorIs(t *testing.T) {
	for code, want := range map[uint64]error{
		CodeUnknownModel: ErrUnknownModel, CodeBadFrame: ErrProtocol, CodeBadRecord: ErrProtocol,
		CodeBadMessage: ErrProtocol, CodeTooLarge: ErrTooLarge, CodeDeadline: ErrDeadline,
		CodeShuttingDown: ErrShuttingDown, 999: ErrInternal,
	} {
		err := error(&DaemonError{Code: code, Name: "X", Message: "m"})
		if !errors.Is(err, want) {
			t.Errorf("code %d does not match %v", code, want)
		}
		if errors.Is(err, ErrClosed) {
			t.Errorf("code %d matches ErrClosed", code)
		}
	}
	if !errors.Is(&DaemonError{Code: CodeDeadline}, context.DeadlineExceeded) {
		t.Error("DEADLINE does not match context.DeadlineExceeded")
	}
	ce := &closedError{msg: "closed", cause: &DaemonError{Code: CodeBadRecord}}
	if !errors.Is(ce, ErrClosed) || !errors.Is(ce, ErrProtocol) {
		t.Error("closedError does not wrap both ErrClosed and its cause")
	}
}
