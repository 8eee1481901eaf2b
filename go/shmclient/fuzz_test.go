package shmclient

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// Fuzz targets for what the client decodes from the daemon: control frames, the welcome,
// and response descriptors. Seeded with the golden vectors; `go test` runs the seeds, and
// tests/run.sh runs each target for a bounded time:
//
//	go test -run '^$' -fuzz '^FuzzReadFrame$' -fuzztime 25s ./shmclient
//
// The properties: no input panics or allocates past its limit; whatever decodes re-encodes
// and decodes to the same value; the response descriptor's fast path agrees with the
// general decoder.

// fuzzSeeds adds the canonical and alternative encodings of every vector of `kind`.
func fuzzSeeds(f *testing.F, kind string, body func([]byte) []byte) {
	f.Helper()
	b, err := os.ReadFile(filepath.Join(vectorsDir, "vectors.json"))
	if err != nil {
		f.Fatalf("golden vectors missing: %v", err)
	}
	var cases []vectorCase
	if err := json.Unmarshal(b, &cases); err != nil {
		f.Fatal(err)
	}
	for _, c := range cases {
		if c.Kind != kind {
			continue
		}
		for _, h := range append([]string{c.Hex}, c.AltHex...) {
			raw, err := hex.DecodeString(h)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(body(raw))
		}
	}
}

func same(b []byte) []byte { return b }

// frameBody strips a whole frame's 4-byte length.
func frameBody(b []byte) []byte {
	if len(b) < 4 {
		return b
	}
	return b[4:]
}

func FuzzReadFrame(f *testing.F) {
	fuzzSeeds(f, "frame", same)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		body, err := readFrame(bytes.NewReader(data), maxFrame)
		if err != nil {
			return
		}
		if len(body) == 0 || len(body) > maxFrame || len(body) > len(data)-4 {
			t.Fatalf("readFrame returned a body of %d bytes from %d bytes", len(body), len(data))
		}
		typ, msg, err := decodeMessage(body)
		if err != nil {
			return
		}
		roundTrip(t, typ, msg)
	})
}

// roundTrip re-encodes a decoded message canonically and decodes it again: the same value.
func roundTrip(t *testing.T, typ string, msg any) {
	t.Helper()
	out, err := appendFrame(nil, msg)
	if err != nil {
		return // e.g. a decoded message too large to send again: refused, not corrupted
	}
	body, err := readFrame(bytes.NewReader(out), maxFrame)
	if err != nil {
		t.Fatalf("re-encoded %s does not frame: %v", typ, err)
	}
	typ2, msg2, err := decodeMessage(body)
	if err != nil {
		t.Fatalf("re-encoded %s does not decode: %v", typ, err)
	}
	if typ2 != typ || !reflect.DeepEqual(msg, msg2) {
		t.Fatalf("%s changed in a round trip:\n%#v\n%#v", typ, msg, msg2)
	}
}

func FuzzWelcome(f *testing.F) {
	fuzzSeeds(f, "frame", frameBody)
	f.Fuzz(func(t *testing.T, body []byte) {
		msg, err := handshakeMsg(body, "welcome")
		if err != nil {
			return
		}
		w, ok := msg.(*welcomeMsg)
		if !ok {
			t.Fatalf("handshakeMsg(welcome) returned a %T", msg)
		}
		if checkWelcome(w) == nil && (w.Version < minProtocolVersion || w.Version > protocolVersion) {
			t.Fatalf("welcome with version %d accepted (this client speaks %d to %d)", w.Version, minProtocolVersion, protocolVersion)
		}
		roundTrip(t, "welcome", w)
	})
}

func FuzzResponseDescriptor(f *testing.F) {
	fuzzSeeds(f, "response_descriptor", same)
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := decodeResponseDesc(b)
		g, gerr := decodeResponseDescGeneral(b)
		if fast, ok := decodeResponseOutputs(b); ok {
			// the fast path may only accept what the general decoder accepts, identically
			if gerr != nil || !reflect.DeepEqual(fast, g) {
				t.Fatalf("fast path: %+v; general decoder: %+v, %v", fast, g, gerr)
			}
		}
		if err != nil {
			return
		}
		if (d.Outputs == nil) == (d.Error == nil) {
			t.Fatalf("decoded descriptor has outputs %v and error %v", d.Outputs, d.Error)
		}
		if len(d.Outputs) > maxTensors {
			t.Fatalf("%d outputs passed the %d limit", len(d.Outputs), maxTensors)
		}
	})
}
