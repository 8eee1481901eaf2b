package shmclient

import (
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// The golden model_list (SPEC §2.4, protocol 4) decodes into ModelInfo with its kind,
// meanings and limits.
func TestModelInfoFromVectors(t *testing.T) {
	var ml *modelListMsg
	for _, c := range loadVectors(t) {
		if c.Name != "model_list" {
			continue
		}
		b, err := hex.DecodeString(c.Hex)
		if err != nil {
			t.Fatal(err)
		}
		_, msg, err := decodeMessage(b[4:])
		if err != nil {
			t.Fatal(err)
		}
		ml = msg.(*modelListMsg)
	}
	if ml == nil || len(ml.Models) != 3 {
		t.Fatalf("model_list vector: %+v", ml)
	}
	r := infoFromWire(ml.Models[2])
	want := ModelInfo{Name: "resnet", Version: 2, Device: "cpu", Kind: "vision.classify",
		Inputs: []TensorSpec{{Name: "image", DType: Bytes, Shape: []int64{-1}, Meaning: "image"}},
		Outputs: []TensorSpec{{Name: "labels", DType: Bytes, Shape: []int64{-1, 5}, Meaning: "labels"},
			{Name: "scores", DType: F32, Shape: []int64{-1, 5}, Meaning: "scores"}},
		Limits:     ModelLimits{MaxBatch: 64, MaxBytes: 33554432, MaxPixels: 40000000, Formats: []string{"png", "jpeg", "webp"}},
		Idempotent: true}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("got %+v\nwant %+v", r, want)
	}
	if id := infoFromWire(ml.Models[0]); id.Kind != "builtin" || len(id.Limits.Formats) != 0 || !id.Idempotent {
		t.Fatalf("identity: %+v", id)
	}
	if mlp := infoFromWire(ml.Models[1]); mlp.Idempotent {
		t.Fatalf("mlp (idempotent: false in the vector): %+v", mlp)
	}
}

func TestModelInfoCheck(t *testing.T) {
	m := &ModelInfo{Name: "resnet", Kind: "vision.classify",
		Inputs:  []TensorSpec{{Name: "image", DType: Bytes, Shape: []int64{-1}, Meaning: "image"}},
		Outputs: []TensorSpec{{Name: "labels", DType: Bytes, Shape: []int64{-1, 5}}},
		Limits:  ModelLimits{MaxBatch: 2, MaxBytes: 100, Formats: []string{"png", "jpeg"}}}
	png := []byte("\x89PNG\r\n\x1a\n....")
	gif := []byte("GIF89a......")
	for _, tc := range []struct {
		name   string
		inputs []Tensor
		want   string
	}{
		{"ok", []Tensor{FromBytes("image", nil, [][]byte{png, {0xff, 0xd8, 0xff, 0xe0}})}, ""},
		{"unknown bytes are the daemon's to judge", []Tensor{FromBytes("image", nil, [][]byte{[]byte("??")})}, ""},
		{"batch", []Tensor{FromBytes("image", nil, [][]byte{png, png, png})}, "at most 2 items"},
		{"bytes", []Tensor{FromBytes("image", nil, [][]byte{png, make([]byte, 101)})}, "item 1 is 101 bytes"},
		{"format", []Tensor{FromBytes("image", nil, [][]byte{gif})}, "item 0 is gif"},
		{"signature", []Tensor{FromUint8("image", []int64{1}, []uint8{1})}, "must be bytes"},
		{"name", []Tensor{FromBytes("pixels", nil, [][]byte{png})}, "has no input \"pixels\""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := m.Check(tc.inputs...)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrBadInput) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrBadInput containing %q", err, tc.want)
			}
		})
	}
}

func TestImageFormat(t *testing.T) {
	for in, want := range map[string]string{
		"\x89PNG\r\n\x1a\nxx": "png", "\xff\xd8\xff\xdb": "jpeg", "RIFF\x00\x00\x00\x00WEBPVP8 ": "webp",
		"GIF87a": "gif", "BM....": "bmp", "II*\x00": "tiff", "MM\x00*": "tiff", "": "", "hello": "",
	} {
		if got := ImageFormat([]byte(in)); got != want {
			t.Errorf("ImageFormat(%q) = %q, want %q", in, got, want)
		}
	}
}
