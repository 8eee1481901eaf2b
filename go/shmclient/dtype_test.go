package shmclient

import (
	"math"
	"testing"
)

func TestParseDType(t *testing.T) {
	for d := F16; d <= AnyDType; d++ {
		got, err := ParseDType(d.String())
		if err != nil || got != d {
			t.Errorf("ParseDType(%q) = %v, %v", d.String(), got, err)
		}
	}
	for _, s := range []string{"", "invalid", "float32", "F32"} {
		if _, err := ParseDType(s); err == nil {
			t.Errorf("ParseDType(%q) succeeded", s)
		}
	}
	if F32.Size() != 4 || BF16.Size() != 2 || Bytes.Size() != 0 || Bool.Size() != 1 || F64.Size() != 8 {
		t.Error("element sizes")
	}
}

func TestBFloat16(t *testing.T) {
	// Every bf16 value survives bf16 -> f32 -> bf16.
	for b := 0; b < 1<<16; b++ {
		f := BFloat16ToFloat32(uint16(b))
		back := Float32ToBFloat16(f)
		if math.IsNaN(float64(f)) {
			if !math.IsNaN(float64(BFloat16ToFloat32(back))) {
				t.Fatalf("NaN %04x became %04x", b, back)
			}
			continue
		}
		if back != uint16(b) {
			t.Fatalf("bf16 %04x -> %v -> %04x", b, f, back)
		}
	}
	// Round to nearest, ties to even.
	for _, tc := range []struct {
		f    uint32
		want uint16
	}{
		{0x3f808000, 0x3f80}, // tie, even stays
		{0x3f818000, 0x3f82}, // tie, odd rounds up
		{0x3f808001, 0x3f81}, // above the tie
		{0x7f7fffff, 0x7f80}, // max float rounds to +Inf
	} {
		if got := Float32ToBFloat16(math.Float32frombits(tc.f)); got != tc.want {
			t.Errorf("Float32ToBFloat16(%08x) = %04x, want %04x", tc.f, got, tc.want)
		}
	}
}

func TestFloat16(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		f := Float16ToFloat32(uint16(h))
		back := Float32ToFloat16(f)
		if math.IsNaN(float64(f)) {
			if back&0x7c00 != 0x7c00 || back&0x3ff == 0 {
				t.Fatalf("NaN %04x became %04x", h, back)
			}
			continue
		}
		if back != uint16(h) {
			t.Fatalf("f16 %04x -> %v -> %04x", h, f, back)
		}
	}
	for _, tc := range []struct {
		f    float32
		want uint16
	}{
		{1, 0x3c00},
		{-2, 0xc000},
		{65504, 0x7bff},
		{65520, 0x7c00},                     // rounds to +Inf
		{float32(math.Pow(2, -24)), 0x0001}, // smallest subnormal
		{float32(math.Pow(2, -25)), 0x0000}, // tie to even: 0
		{float32(3 * math.Pow(2, -26)), 0x0001},
		{float32(math.Pow(2, -14)), 0x0400}, // smallest normal
		{float32(math.Inf(-1)), 0xfc00},
		{1 + 1.0/2048, 0x3c00}, // tie, even stays
		{1 + 3.0/2048, 0x3c02}, // tie, odd rounds up
	} {
		if got := Float32ToFloat16(tc.f); got != tc.want {
			t.Errorf("Float32ToFloat16(%v) = %04x, want %04x", tc.f, got, tc.want)
		}
	}
}

func TestTensorAccessors(t *testing.T) {
	x := FromFloat32("x", []int64{2, 2}, []float32{1, 2, 3, 4})
	x.Float32s()[3] = 9 // views alias Data
	if x.Float32s()[3] != 9 || len(x.Data) != 16 {
		t.Fatal("Float32s is not a view")
	}
	if err := x.checkData(); err != nil {
		t.Fatal(err)
	}
	mustPanic(t, "wrong dtype", func() { x.Int64s() })
	mustPanic(t, "misaligned", func() {
		b := make([]byte, 20)
		Tensor{Name: "x", DType: F32, Shape: []int64{4}, Data: b[1:17]}.Float32s()
	})
	mustPanic(t, "bad bool", func() { Tensor{DType: Bool, Data: []byte{0, 2}}.Bools() })
	if got := FromBool("b", nil, []bool{true, false}).Bools(); !got[0] || got[1] {
		t.Fatal("Bools")
	}
	if (Tensor{DType: Bool, Shape: []int64{1}, Data: []byte{3}}).checkData() == nil {
		t.Fatal("bool byte 3 accepted")
	}
	if (Tensor{DType: F32, Shape: []int64{3}, Data: make([]byte, 8)}).checkData() == nil {
		t.Fatal("short data accepted")
	}
	if (Tensor{DType: F32, Shape: []int64{-1}, Data: nil}).checkData() == nil {
		t.Fatal("negative dim accepted")
	}
	if (Tensor{DType: U8, Shape: []int64{1 << 62, 1 << 62}}).checkData() == nil {
		t.Fatal("overflowing shape accepted")
	}
	u := FromUint8("u", []int64{3}, []byte{1, 2, 3})
	if c := u.Clone(); &c.Data[0] == &u.Data[0] || string(c.Data) != string(u.Data) {
		t.Fatal("Clone")
	}
}

func TestBytesTensor(t *testing.T) {
	x := FromStrings("s", []int64{2, 2}, []string{"a", "", "héllo", "xyz"})
	if err := x.checkData(); err != nil {
		t.Fatal(err)
	}
	if len(x.Data) != 4*4+1+0+6+3 {
		t.Fatalf("nbytes %d", len(x.Data))
	}
	got, err := x.Strings()
	if err != nil || len(got) != 4 || got[2] != "héllo" || got[1] != "" {
		t.Fatalf("Strings() = %q, %v", got, err)
	}
	if FromBytes("b", nil, [][]byte{{1}, {2, 3}}).Shape[0] != 2 {
		t.Fatal("nil shape of FromBytes")
	}
	for name, data := range map[string][]byte{
		"short lengths": {1, 0, 0},
		"overrun":       {5, 0, 0, 0, 'a'},
		"trailing":      {1, 0, 0, 0, 'a', 'b'},
		"huge length":   {0xff, 0xff, 0xff, 0xff, 'a'},
	} {
		tt := Tensor{Name: name, DType: Bytes, Shape: []int64{1}, Data: data}
		if _, err := tt.ByteStrings(); err == nil {
			t.Errorf("%s: accepted", name)
		}
		if tt.checkData() == nil {
			t.Errorf("%s: checkData accepted", name)
		}
	}
}

func mustPanic(t *testing.T, what string, f func()) {
	t.Helper()
	defer func() {
		if recover() == nil {
			t.Errorf("%s: no panic", what)
		}
	}()
	f()
}
