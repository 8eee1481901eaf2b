package shmclient

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tensord/tensord/go/shmclient/internal/shmtest"
)

const vectorsDir = "../../protocol/vectors"

type vectorCase struct {
	Name   string          `json:"name"`
	Kind   string          `json:"kind"`
	Hex    string          `json:"hex"`
	Value  json.RawMessage `json:"value"`
	AltHex []string        `json:"alt_hex"`
}

func loadVectors(t *testing.T) []vectorCase {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(vectorsDir, "vectors.json"))
	if err != nil {
		t.Fatalf("golden vectors missing (generate them with protocol/vectors/generate.py): %v", err)
	}
	var cases []vectorCase
	if err := json.Unmarshal(b, &cases); err != nil {
		t.Fatal(err)
	}
	if len(cases) == 0 {
		t.Fatal("vectors.json holds no cases")
	}
	return cases
}

// orderedJSON parses JSON into the shape decodeMsgpack produces (mpMap keeps key order,
// integers are uint64 when non-negative and int64 otherwise), so the two compare with
// reflect.DeepEqual, key order included.
func orderedJSON(t *testing.T, raw []byte) any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	v, err := jsonValue(dec)
	if err != nil {
		t.Fatalf("parsing value %s: %v", raw, err)
	}
	return v
}

func jsonValue(dec *json.Decoder) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch x := tok.(type) {
	case json.Delim:
		switch x {
		case '{':
			m := mpMap{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return nil, err
				}
				v, err := jsonValue(dec)
				if err != nil {
					return nil, err
				}
				m = append(m, mpKV{k.(string), v})
			}
			_, err := dec.Token()
			return m, err
		case '[':
			a := []any{}
			for dec.More() {
				v, err := jsonValue(dec)
				if err != nil {
					return nil, err
				}
				a = append(a, v)
			}
			_, err := dec.Token()
			return a, err
		}
	case json.Number:
		s := x.String()
		if strings.ContainsAny(s, ".eE") {
			return x.Float64()
		}
		if strings.HasPrefix(s, "-") {
			var i int64
			_, err := fmt.Sscan(s, &i)
			return i, err
		}
		var u uint64
		_, err := fmt.Sscan(s, &u)
		return u, err
	case string, bool, nil:
		return x, nil
	}
	return nil, fmt.Errorf("unexpected token %v", tok)
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// decodeCase decodes wire bytes with the client's own decoders and re-encodes them with
// its own encoders, returning the generic tree (for comparing with value) and the
// re-encoding (for comparing with hex).
func decodeCase(t *testing.T, kind string, b []byte) (tree any, reencoded []byte) {
	t.Helper()
	switch kind {
	case "frame":
		body, err := readFrame(bytes.NewReader(b), maxFrame)
		if err != nil {
			t.Fatalf("readFrame: %v", err)
		}
		if n := len(b) - 4 - len(body); n != 0 {
			t.Fatalf("%d bytes after the frame", n)
		}
		tree, err := decodeMsgpack(body)
		if err != nil {
			t.Fatal(err)
		}
		_, msg, err := decodeMessage(body)
		if err != nil {
			t.Fatalf("decodeMessage: %v", err)
		}
		out, err := appendFrame(nil, msg)
		if err != nil {
			t.Fatal(err)
		}
		return tree, out
	case "request_descriptor":
		tree, err := decodeMsgpack(b)
		if err != nil {
			t.Fatal(err)
		}
		d, err := decodeRequestDesc(b)
		if err != nil {
			t.Fatal(err)
		}
		out, err := marshal(nil, d)
		if err != nil {
			t.Fatal(err)
		}
		checkFastRequestEncoder(t, d, out)
		return tree, out
	case "response_descriptor":
		tree, err := decodeMsgpack(b)
		if err != nil {
			t.Fatal(err)
		}
		d, err := decodeResponseDesc(b)
		if err != nil {
			t.Fatal(err)
		}
		// The general decoder must agree with whatever the fast path (inside
		// decodeResponseDesc) made of the same bytes.
		if g, err := decodeResponseDescGeneral(b); err != nil || !reflect.DeepEqual(g, d) {
			t.Fatalf("general decoder: %+v, %v; fast path: %+v", g, err, d)
		}
		out, err := marshal(nil, d)
		if err != nil {
			t.Fatal(err)
		}
		return tree, out
	case "record_header":
		if len(b) != recordHeaderSize {
			t.Fatalf("record header of %d bytes", len(b))
		}
		h := getRecordHeader(b)
		out := make([]byte, recordHeaderSize)
		putRecordHeader(out, h)
		return headerTree(h), out
	}
	t.Fatalf("unknown vector kind %q", kind)
	return nil, nil
}

// checkFastRequestEncoder holds the hand-written request descriptor encoder (the one
// Send uses) to the general encoder's canonical output.
func checkFastRequestEncoder(t *testing.T, d *requestDesc, want []byte) {
	t.Helper()
	if got := appendRequestDesc(nil, d); !bytes.Equal(got, want) {
		t.Errorf("appendRequestDesc\n got %x\nwant %x", got, want)
	}
	if n := requestDescLen(d); n != len(want) {
		t.Errorf("requestDescLen %d, encoding is %d bytes", n, len(want))
	}
}

func headerTree(h recordHeader) mpMap {
	return mpMap{
		{"record_len", uint64(h.Len)},
		{"kind", uint64(h.Kind)},
		{"request_id", h.RequestID},
		{"desc_len", uint64(h.DescLen)},
	}
}

// encodeValue builds the typed wire value from the JSON value and encodes it: the
// encoder, not the decoder, is under test here.
func encodeValue(t *testing.T, kind string, value any) []byte {
	t.Helper()
	switch kind {
	case "frame":
		m := value.(mpMap)
		typ, _ := m.get("type")
		msg, ok := messageFor(typ.(string))
		if !ok {
			t.Fatalf("no message type %v", typ)
		}
		if err := fromTree(m, msg, "value"); err != nil {
			t.Fatal(err)
		}
		out, err := appendFrame(nil, msg)
		if err != nil {
			t.Fatal(err)
		}
		return out
	case "request_descriptor":
		var d requestDesc
		if err := fromTree(value, &d, "value"); err != nil {
			t.Fatal(err)
		}
		out, err := marshal(nil, &d)
		if err != nil {
			t.Fatal(err)
		}
		checkFastRequestEncoder(t, &d, out)
		return out
	case "response_descriptor":
		var d responseDesc
		if err := fromTree(value, &d, "value"); err != nil {
			t.Fatal(err)
		}
		out, err := marshal(nil, &d)
		if err != nil {
			t.Fatal(err)
		}
		return out
	case "record_header":
		var h struct {
			Len       uint32 `msgpack:"record_len"`
			Kind      uint32 `msgpack:"kind"`
			RequestID uint64 `msgpack:"request_id"`
			DescLen   uint32 `msgpack:"desc_len"`
		}
		if err := fromTree(value, &h, "value"); err != nil {
			t.Fatal(err)
		}
		out := make([]byte, recordHeaderSize)
		putRecordHeader(out, recordHeader(h))
		return out
	}
	t.Fatalf("unknown vector kind %q", kind)
	return nil
}

func TestGoldenVectors(t *testing.T) {
	for _, c := range loadVectors(t) {
		t.Run(c.Kind+"/"+c.Name, func(t *testing.T) {
			want := mustHex(t, c.Hex)
			value := orderedJSON(t, c.Value)

			tree, re := decodeCase(t, c.Kind, want)
			if !reflect.DeepEqual(tree, value) {
				t.Errorf("decoded value\n got %#v\nwant %#v", tree, value)
			}
			if !bytes.Equal(re, want) {
				t.Errorf("decode+re-encode\n got %x\nwant %x", re, want)
			}
			if enc := encodeValue(t, c.Kind, value); !bytes.Equal(enc, want) {
				t.Errorf("encode(value)\n got %x\nwant %x", enc, want)
			}
			for i, alt := range c.AltHex {
				tree, re := decodeCase(t, c.Kind, mustHex(t, alt))
				if !reflect.DeepEqual(tree, value) {
					t.Errorf("alt_hex[%d] decoded\n got %#v\nwant %#v", i, tree, value)
				}
				if !bytes.Equal(re, want) {
					t.Errorf("alt_hex[%d] re-encoded\n got %x\nwant %x", i, re, want)
				}
			}
		})
	}
}

type ringImageRecord struct {
	Position      uint64          `json:"position"`
	SegmentOffset uint64          `json:"segment_offset"`
	RecordLen     uint32          `json:"record_len"`
	Kind          uint32          `json:"kind"`
	RequestID     uint64          `json:"request_id"`
	DescLen       uint32          `json:"desc_len"`
	Descriptor    json.RawMessage `json:"descriptor"`
	Tensors       []string        `json:"tensors"`
}

type ringImageRing struct {
	Head            uint64            `json:"head"`
	Tail            uint64            `json:"tail"`
	ProducerWaiting *uint32           `json:"producer_waiting"`
	ConsumerWaiting *uint32           `json:"consumer_waiting"`
	Records         []ringImageRecord `json:"records"`
}

func TestRingImage(t *testing.T) {
	img, err := os.ReadFile(filepath.Join(vectorsDir, "ring_image.bin"))
	if err != nil {
		t.Fatalf("ring image missing: %v", err)
	}
	js, err := os.ReadFile(filepath.Join(vectorsDir, "ring_image.json"))
	if err != nil {
		t.Fatal(err)
	}
	var want struct {
		SegmentSize  uint64        `json:"segment_size"`
		RequestRing  ringImageRing `json:"request_ring"`
		ResponseRing ringImageRing `json:"response_ring"`
	}
	if err := json.Unmarshal(js, &want); err != nil {
		t.Fatal(err)
	}
	if uint64(len(img)) != want.SegmentSize {
		t.Fatalf("image is %d bytes, json says %d", len(img), want.SegmentSize)
	}

	// Put the image in a memfd, as a real session's segment is, and map it like one.
	fd, err := shmtest.Memfd("tensord-test-ring-image", int64(len(img)), img)
	if err != nil {
		t.Fatal(err)
	}
	seg, err := mapSegment(fd, uint64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(seg.release)
	reqCap, respCap := seg.u64(offReqRingCapacity), seg.u64(offRespRingCapacity)
	if err := seg.check(&welcomeMsg{SegmentSize: want.SegmentSize, RequestRing: reqCap, ResponseRing: respCap}); err != nil {
		t.Fatal(err)
	}

	check := func(t *testing.T, r ringMem, kind uint32, w ringImageRing, ringOffset uint64) {
		if got := *r.head; got != w.Head {
			t.Errorf("head %d, want %d", got, w.Head)
		}
		if got := *r.tail; got != w.Tail {
			t.Errorf("tail %d, want %d", got, w.Tail)
		}
		if w.ProducerWaiting != nil && *r.producerWaiting != *w.ProducerWaiting {
			t.Errorf("producer_waiting %d, want %d", *r.producerWaiting, *w.ProducerWaiting)
		}
		if w.ConsumerWaiting != nil && *r.consumerWaiting != *w.ConsumerWaiting {
			t.Errorf("consumer_waiting %d, want %d", *r.consumerWaiting, *w.ConsumerWaiting)
		}
		c := consumer{r: r, readPos: w.Head, head: w.Head, lastTail: w.Head}
		stop := func() (d time.Duration, err error) { return 0, io.EOF }
		for _, wr := range w.Records {
			if wr.SegmentOffset != ringOffset+wr.Position%r.capacity {
				t.Errorf("record at %d: json segment_offset %d disagrees with position", wr.Position, wr.SegmentOffset)
			}
			if wr.Kind == kindPad {
				// next skips PADs; check the header where the json says it is.
				h := getRecordHeader(r.buf[wr.Position%r.capacity:])
				if h != (recordHeader{Len: wr.RecordLen, Kind: kindPad}) {
					t.Errorf("PAD at %d: header %+v", wr.Position, h)
				}
				continue
			}
			rec, err := c.next(kind, stop)
			if err != nil {
				t.Fatalf("record at %d: %v", wr.Position, err)
			}
			pos := c.readPos - uint64(rec.hdr.Len)
			if pos != wr.Position {
				t.Errorf("record read at %d, want %d", pos, wr.Position)
			}
			if rec.hdr != (recordHeader{Len: wr.RecordLen, Kind: wr.Kind, RequestID: wr.RequestID, DescLen: wr.DescLen}) {
				t.Errorf("record at %d: header %+v", wr.Position, rec.hdr)
			}
			descBytes := rec.body[recordHeaderSize : recordHeaderSize+rec.hdr.DescLen]
			tree, err := decodeMsgpack(descBytes)
			if err != nil {
				t.Fatal(err)
			}
			if wd := orderedJSON(t, wr.Descriptor); !reflect.DeepEqual(tree, wd) {
				t.Errorf("record at %d: descriptor\n got %#v\nwant %#v", wr.Position, tree, wd)
			}
			var refs []tensorRef
			if kind == kindRequest {
				d, err := decodeRequestDesc(descBytes)
				if err != nil {
					t.Fatal(err)
				}
				refs = d.Inputs
			} else {
				d, err := decodeResponseDesc(descBytes)
				if err != nil {
					t.Fatal(err)
				}
				refs = d.Outputs
			}
			if len(refs) != len(wr.Tensors) {
				t.Fatalf("record at %d: %d tensor refs, json has %d tensors", wr.Position, len(refs), len(wr.Tensors))
			}
			for i, ref := range refs {
				got := rec.body[ref.Offset : ref.Offset+ref.NBytes]
				if !bytes.Equal(got, mustHex(t, wr.Tensors[i])) {
					t.Errorf("record at %d: tensor %q bytes differ", wr.Position, ref.Name)
				}
			}
			c.release(rec.seq)
		}
		if c.readPos != w.Tail {
			t.Errorf("reader stopped at %d, tail is %d", c.readPos, w.Tail)
		}
		if *r.head != w.Tail {
			t.Errorf("after releasing everything head is %d, want %d", *r.head, w.Tail)
		}
	}
	t.Run("request_ring", func(t *testing.T) {
		check(t, seg.ring(offReqControl, headerSize, reqCap), kindRequest, want.RequestRing, headerSize)
	})
	t.Run("response_ring", func(t *testing.T) {
		check(t, seg.ring(offRespControl, headerSize+reqCap, respCap), kindResponse, want.ResponseRing, headerSize+reqCap)
	})
}
