package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// What a client can make the gateway hold is bounded (issue 19 item 4); every answer is
// the protocol's JSON (issue 17 item 11). The memory test with a real gateway process is
// tests/test_gateway.py::test_memory_stays_within_the_budget.

func TestBodyBudgetIsTakenAsBytesArriveAndGivenBack(t *testing.T) {
	b := &budget{limit: 300 << 10}
	bd, err := readBody(strings.NewReader(strings.Repeat("x", 100<<10)), 1<<20, b)
	if err != nil {
		t.Fatal(err)
	}
	if len(bd.buf) != 100<<10 || b.used.Load() < 100<<10 {
		t.Fatalf("read %d bytes holding %d", len(bd.buf), b.used.Load())
	}
	// The budget cannot take a second body of that size while the first is held.
	if _, err := readBody(strings.NewReader(strings.Repeat("y", 200<<10)), 1<<20, b); err != errBudget {
		t.Fatalf("second body: %v, want 429", err)
	}
	bd.free()
	if b.used.Load() != 0 {
		t.Fatalf("%d bytes still held after free", b.used.Load())
	}
	if _, err := readBody(strings.NewReader(strings.Repeat("z", 11)), 10, b); err == nil || !strings.Contains(err.Error(), "-max-body") {
		t.Fatalf("a body of 11 bytes with -max-body 10: %v", err)
	}
	if b.used.Load() != 0 {
		t.Fatalf("%d bytes held after a refused body", b.used.Load())
	}
}

func gatewayWithLimits(maxBody, inflight int64, bodyTimeout time.Duration) *gateway {
	g := newTestGateway(&fakeBackend{})
	g.maxBody, g.inflight, g.bodyTimeout = maxBody, &budget{limit: inflight}, bodyTimeout
	return g
}

// rawRequest sends a request head and then body by hand, as a lying client would.
func rawRequest(t *testing.T, addr, head string, body []byte, pause time.Duration) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, head)
	for _, b := range body {
		if _, err := c.Write([]byte{b}); err != nil {
			break
		}
		time.Sleep(pause)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e struct{ Error string }
	if json.Unmarshal(b, &e) != nil || e.Error == "" {
		t.Fatalf("answer %d is not the protocol's JSON error: %q", resp.StatusCode, b)
	}
	return resp.StatusCode, e.Error
}

func TestLyingContentLengthAndSlowBodies(t *testing.T) {
	g := gatewayWithLimits(1<<20, 4<<20, 300*time.Millisecond)
	srv := httptest.NewServer(g.routes())
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	// Announces 256 MiB: refused from the header, nothing allocated.
	code, msg := rawRequest(t, addr, "POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 268435456\r\n\r\n", []byte("{"), 0)
	if code != 413 || !strings.Contains(msg, "Content-Length") {
		t.Fatalf("256 MiB Content-Length: %d %s", code, msg)
	}
	// Announces less than -max-body and trickles: cut off at -body-timeout with 408.
	start := time.Now()
	code, msg = rawRequest(t, addr, "POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", []byte(`{"inputs":[]}`), 50*time.Millisecond)
	if code != 408 || time.Since(start) > 5*time.Second {
		t.Fatalf("slow body: %d %s after %v", code, msg, time.Since(start))
	}
	if g.inflight.used.Load() != 0 {
		t.Fatalf("%d bytes still held", g.inflight.used.Load())
	}
}

func TestGzipBombCountsDecompressedBytes(t *testing.T) {
	g := gatewayWithLimits(1<<20, 4<<20, time.Minute)
	srv := httptest.NewServer(g.routes())
	defer srv.Close()
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(bytes.Repeat([]byte(" "), 64<<20)) // 64 MiB of spaces in ~64 KiB
	zw.Close()
	resp, body := post(t, srv, "/v2/models/echo/infer", z.Bytes(), map[string]string{"Content-Encoding": "gzip"})
	if resp.StatusCode != 413 || !strings.Contains(string(body), "-max-body") {
		t.Fatalf("%d compressed bytes expanding to 64 MiB: %d %s", z.Len(), resp.StatusCode, body)
	}
	if g.inflight.used.Load() != 0 {
		t.Fatalf("%d bytes still held", g.inflight.used.Load())
	}
}

func TestEveryAnswerIsJSON(t *testing.T) {
	srv := httptest.NewServer(newTestGateway(&fakeBackend{}).routes())
	defer srv.Close()
	for _, tc := range []struct {
		method, path string
		status       int
	}{
		{"GET", "/v2/nope", 404},
		{"GET", "/", 404},
		{"DELETE", "/v2/models/echo/infer", 405},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var e struct{ Error string }
		if resp.StatusCode != tc.status || json.Unmarshal(b, &e) != nil || e.Error == "" || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s: %d %q", tc.method, tc.path, resp.StatusCode, b)
		}
	}
}

func TestModelConfigAndStatistics(t *testing.T) {
	srv := httptest.NewServer(newTestGateway(&fakeBackend{}).routes())
	defer srv.Close()
	get := func(path string) map[string]any {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %d %v", path, resp.StatusCode, err)
		}
		return v
	}
	cfg := get("/v2/models/echo/config")
	if cfg["name"] != "echo" || cfg["platform"] != "tensord/builtin" || len(cfg["input"].([]any)) != 1 {
		t.Fatalf("config: %v", cfg)
	}
	st := get("/v2/models/echo/stats")["model_stats"].([]any)[0].(map[string]any)
	inf := st["inference_stats"].(map[string]any)
	if st["inference_count"] != 10.0 || st["execution_count"] != 4.0 ||
		inf["success"].(map[string]any)["count"] != 10.0 || inf["fail"].(map[string]any)["count"] != 3.0 ||
		inf["compute_infer"].(map[string]any)["ns"] != 1e7 || len(st["batch_stats"].([]any)) != 2 {
		t.Fatalf("stats: %v", st)
	}
	if all := get("/v2/models/stats")["model_stats"].([]any); len(all) != 1 {
		t.Fatalf("all stats: %v", all)
	}
	resp, _ := http.Get(srv.URL + "/v2/models/nope/config")
	if resp.StatusCode != 404 {
		t.Fatalf("config of an unknown model: %d", resp.StatusCode)
	}
}

// rawCodec sends bytes as they are: what a client with the wrong schema, or none, sends.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }
func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}
func (rawCodec) Unmarshal(mem.BufferSlice, any) error { return nil }

func TestGRPCGarbageIsInvalidArgument(t *testing.T) {
	conn := grpcConnTo(t, newTestGateway(&fakeBackend{}))
	for _, garbage := range [][]byte{{0xff, 0xff, 0xff}, []byte("not protobuf at all \x00\x01")} {
		var out []byte
		err := conn.Invoke(context.Background(), "/inference.GRPCInferenceService/ModelInfer", garbage, &out, grpc.ForceCodecV2(rawCodec{}))
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%q: %v, want INVALID_ARGUMENT", garbage, err)
		}
	}
}
