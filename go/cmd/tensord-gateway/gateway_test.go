package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tensord/tensord/go/cmd/tensord-gateway/pb"
	"github.com/tensord/tensord/go/shmclient"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
)

// fakeBackend serves "echo" (outputs y = the first input, z = the second if any) and fails
// "broken" with err. Real daemons are in tests/test_gateway.py.
type fakeBackend struct {
	notReady bool
	err      error
	deadline time.Duration // time left on the last Infer's context
	released int
}

var echoInfo = shmclient.ModelInfo{Name: "echo", Version: 3, Device: "cpu", Kind: "builtin",
	Inputs:  []shmclient.TensorSpec{{Name: "x", DType: shmclient.AnyDType}},
	Outputs: []shmclient.TensorSpec{{Name: "y", DType: shmclient.AnyDType}, {Name: "z", DType: shmclient.AnyDType}},
	Limits:  shmclient.ModelLimits{MaxBatch: 8, Formats: []string{"png"}}}

func (f *fakeBackend) Ready() bool { return !f.notReady }

func (f *fakeBackend) Models(context.Context) ([]shmclient.ModelInfo, error) {
	if f.notReady {
		return nil, errNotReady
	}
	broken := echoInfo
	broken.Name = "broken"
	return []shmclient.ModelInfo{broken, echoInfo}, nil
}

func (f *fakeBackend) Model(ctx context.Context, name string) (*shmclient.ModelInfo, error) {
	ms, err := f.Models(ctx)
	if err != nil {
		return nil, err
	}
	for i := range ms {
		if ms[i].Name == name {
			return &ms[i], nil
		}
	}
	return nil, fmt.Errorf("%w: no model %q", shmclient.ErrUnknownModel, name)
}

func (f *fakeBackend) Stats(context.Context) ([]shmclient.ModelStats, error) {
	if f.notReady {
		return nil, errNotReady
	}
	return []shmclient.ModelStats{{Name: "echo", Version: 3, Served: 10, Failed: 1, Rejected: 2,
		Batches: 4, BatchSizes: map[int]uint64{1: 2, 4: 2}, QueueTime: 5 * time.Millisecond,
		ComputeTime: 10 * time.Millisecond}}, nil
}

func (f *fakeBackend) Infer(ctx context.Context, model string, inputs []shmclient.Tensor) ([]shmclient.Tensor, func(), error) {
	if dl, ok := ctx.Deadline(); ok {
		f.deadline = time.Until(dl)
	}
	if model == "broken" {
		return nil, nil, f.err
	}
	out := make([]shmclient.Tensor, len(inputs))
	for i, t := range inputs {
		out[i] = shmclient.Tensor{Name: string(rune('y' + i)), DType: t.DType, Shape: t.Shape, Data: bytes.Clone(t.Data)}
	}
	return out, func() { f.released++ }, nil
}

func newTestGateway(f *fakeBackend) *gateway {
	return &gateway{b: f, log: slog.New(slog.NewTextHandler(io.Discard, nil)), maxTimeout: time.Minute, maxBody: 1 << 20}
}

func post(t *testing.T, srv *httptest.Server, path string, body []byte, header map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest("POST", srv.URL+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

type restResponse struct {
	ModelName    string `json:"model_name"`
	ModelVersion string `json:"model_version"`
	ID           string `json:"id"`
	Outputs      []struct {
		Name       string          `json:"name"`
		Datatype   string          `json:"datatype"`
		Shape      []int64         `json:"shape"`
		Data       json.RawMessage `json:"data"`
		Parameters struct {
			BinaryDataSize *int `json:"binary_data_size"`
		} `json:"parameters"`
	} `json:"outputs"`
	Error string `json:"error"`
}

func TestRESTJSONRoundTripsEveryDatatype(t *testing.T) {
	f := &fakeBackend{}
	srv := httptest.NewServer(newTestGateway(f).routes())
	defer srv.Close()
	for _, tc := range []struct{ datatype, data, want string }{
		{"FP32", `[[1.5, -2], [3e-3, 0.1]]`, `[1.5,-2,0.003,0.1]`},
		{"FP64", `[0.1, 1e300, -0, 2]`, `[0.1,1e+300,-0,2]`},
		{"FP16", `[1, 0.5, -2, 65504]`, `[1,0.5,-2,65504]`},
		{"BF16", `[1, 0.5, -2, 3]`, `[1,0.5,-2,3]`},
		{"INT8", `[-128, 127, 0, 1]`, `[-128,127,0,1]`},
		{"INT16", `[-32768, 32767, 0, 1]`, `[-32768,32767,0,1]`},
		{"INT32", `[-2147483648, 2147483647, 0, 1]`, `[-2147483648,2147483647,0,1]`},
		{"INT64", `[-9223372036854775808, 9223372036854775807, 0, 1]`, `[-9223372036854775808,9223372036854775807,0,1]`},
		{"UINT8", `[0, 255, 7, 1]`, `[0,255,7,1]`},
		{"BOOL", `[true, false, true, true]`, `[true,false,true,true]`},
		{"BYTES", `["a", "\"quoted\"", "héllo", ""]`, `["a","\"quoted\"","héllo",""]`},
	} {
		t.Run(tc.datatype, func(t *testing.T) {
			body := fmt.Sprintf(`{"id":"r1","inputs":[{"name":"x","shape":[2,2],"datatype":%q,"data":%s}]}`, tc.datatype, tc.data)
			resp, b := post(t, srv, "/v2/models/echo/infer", []byte(body), nil)
			if resp.StatusCode != 200 {
				t.Fatalf("%d %s", resp.StatusCode, b)
			}
			var r restResponse
			if err := json.Unmarshal(b, &r); err != nil {
				t.Fatalf("%v: %s", err, b)
			}
			if r.ModelName != "echo" || r.ModelVersion != "3" || r.ID != "r1" || len(r.Outputs) != 1 {
				t.Fatalf("response %s", b)
			}
			o := r.Outputs[0]
			if o.Name != "y" || o.Datatype != tc.datatype || fmt.Sprint(o.Shape) != "[2 2]" || string(o.Data) != tc.want {
				t.Fatalf("output %s", b)
			}
		})
	}
	if f.released != 11 {
		t.Fatalf("outputs released %d times, want 11", f.released)
	}
}

// binaryBody builds a Triton-style request: JSON header, then each input's raw bytes.
func binaryBody(t *testing.T, header any, raws ...[]byte) ([]byte, map[string]string) {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	body := append([]byte(nil), h...)
	for _, r := range raws {
		body = append(body, r...)
	}
	return body, map[string]string{headerLength: strconv.Itoa(len(h))}
}

func prefixed(items ...string) []byte {
	var b []byte
	for _, s := range items {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	return b
}

func TestRESTBinaryExtension(t *testing.T) {
	srv := httptest.NewServer(newTestGateway(&fakeBackend{}).routes())
	defer srv.Close()
	f32 := make([]byte, 12)
	for i, v := range []float32{1, -2.5, 3} {
		binary.LittleEndian.PutUint32(f32[4*i:], math.Float32bits(v))
	}
	strs := prefixed("cat", "", "dög")
	body, h := binaryBody(t, map[string]any{
		"inputs": []any{
			map[string]any{"name": "x", "shape": []int{3}, "datatype": "FP32", "parameters": map[string]any{"binary_data_size": 12}},
			map[string]any{"name": "w", "shape": []int{1, 3}, "datatype": "BYTES", "parameters": map[string]any{"binary_data_size": len(strs)}},
		},
		"outputs": []any{
			map[string]any{"name": "z", "parameters": map[string]any{"binary_data": true}},
			map[string]any{"name": "y", "parameters": map[string]any{"binary_data": false}},
		},
	}, f32, strs)
	resp, b := post(t, srv, "/v2/models/echo/versions/3/infer", body, h)
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	n, err := strconv.Atoi(resp.Header.Get(headerLength))
	if err != nil {
		t.Fatalf("no %s header: %v", headerLength, resp.Header)
	}
	var r restResponse
	if err := json.Unmarshal(b[:n], &r); err != nil {
		t.Fatal(err)
	}
	if len(r.Outputs) != 2 || r.Outputs[0].Name != "z" || r.Outputs[1].Name != "y" {
		t.Fatalf("outputs not in the requested order: %s", b[:n])
	}
	if s := r.Outputs[0].Parameters.BinaryDataSize; s == nil || *s != len(strs) || !bytes.Equal(b[n:], strs) {
		t.Fatalf("BYTES output: header %s, binary %q", b[:n], b[n:])
	}
	if string(r.Outputs[1].Data) != "[1,-2.5,3]" {
		t.Fatalf("JSON output: %s", b[:n])
	}
	// binary_data_output makes every output binary
	body, h = binaryBody(t, map[string]any{
		"inputs":     []any{map[string]any{"name": "x", "shape": []int{3}, "datatype": "FP32", "data": []float32{1, -2.5, 3}}},
		"parameters": map[string]any{"binary_data_output": true},
	})
	resp, b = post(t, srv, "/v2/models/echo/infer", body, h)
	n, _ = strconv.Atoi(resp.Header.Get(headerLength))
	if resp.StatusCode != 200 || !bytes.Equal(b[n:], f32) {
		t.Fatalf("%d %q", resp.StatusCode, b)
	}
}

func TestRESTErrorsMapToStatuses(t *testing.T) {
	f := &fakeBackend{}
	srv := httptest.NewServer(newTestGateway(f).routes())
	defer srv.Close()
	x := `{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}`
	for _, tc := range []struct {
		name, path, body string
		header           map[string]string
		backendErr       error
		status           int
		msg              string
	}{
		{"not JSON", "/v2/models/echo/infer", `{"inputs":`, nil, nil, 400, "not a valid inference request"},
		{"unknown datatype", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[1],"datatype":"FP8","data":[1]}]}`, nil, nil, 400, "unknown datatype"},
		{"unsigned", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[1],"datatype":"UINT32","data":[1]}]}`, nil, nil, 400, "UINT8 and signed"},
		{"count", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}`, nil, nil, 400, "has 2 elements, its shape has 3"},
		{"range", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[300]}]}`, nil, nil, 400, "300 is not an integer of 8 bits"},
		{"no data", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[1],"datatype":"INT8"}]}`, nil, nil, 400, "neither data nor a binary_data_size"},
		{"binary size", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}`, map[string]string{headerLength: "200"}, nil, 400, "is not a length within"},
		{"unknown output", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}],"outputs":[{"name":"q"}]}`, nil, nil, 400, `has no output "q"`},
		{"classification", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}],"outputs":[{"name":"y","parameters":{"classification":3}}]}`, nil, nil, 400, "classification extension"},
		{"unknown model", "/v2/models/nope/infer", x, nil, nil, 404, `no model "nope"`},
		{"other version", "/v2/models/echo/versions/2/infer", x, nil, nil, 404, "version 2 is not served"},
		{"bad input", "/v2/models/broken/infer", x, nil, &shmclient.DaemonError{Code: shmclient.CodeBadInput, Name: "BAD_INPUT", Message: "image 0: not an image"}, 400, "image 0: not an image"},
		{"too large", "/v2/models/broken/infer", x, nil, fmt.Errorf("%w: record of 9 GiB", shmclient.ErrTooLarge), 413, "9 GiB"},
		{"deadline", "/v2/models/broken/infer", x, nil, &shmclient.DaemonError{Code: shmclient.CodeDeadline, Name: "DEADLINE"}, 504, "DEADLINE"},
		{"overloaded", "/v2/models/broken/infer", x, nil, &shmclient.DaemonError{Code: shmclient.CodeOverloaded, Name: "OVERLOADED"}, 429, "OVERLOADED"},
		{"daemon gone", "/v2/models/broken/infer", x, nil, fmt.Errorf("%w: EOF", shmclient.ErrClosed), 503, "connection closed"},
		{"model failed", "/v2/models/broken/infer", x, nil, &shmclient.DaemonError{Code: shmclient.CodeModelFailed, Name: "MODEL_FAILED", Message: "boom"}, 500, "boom"},
		{"body too large", "/v2/models/echo/infer", `{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["` + strings.Repeat("a", 2<<20) + `"]}]}`, nil, nil, 413, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.err = tc.backendErr
			resp, b := post(t, srv, tc.path, []byte(tc.body), tc.header)
			var r restResponse
			json.Unmarshal(b, &r)
			if resp.StatusCode != tc.status || !strings.Contains(r.Error, tc.msg) {
				t.Fatalf("got %d %s, want %d with %q", resp.StatusCode, b, tc.status, tc.msg)
			}
		})
	}
}

func TestRESTHealthMetadataAndDraining(t *testing.T) {
	f := &fakeBackend{}
	g := newTestGateway(f)
	srv := httptest.NewServer(g.routes())
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for path, want := range map[string]int{"/v2/health/live": 200, "/v2/health/ready": 200,
		"/v2/models/echo/ready": 200, "/v2/models/echo/versions/3/ready": 200,
		"/v2/models/echo/versions/4/ready": 404, "/v2/models/nope/ready": 404} {
		if got, b := get(path); got != want {
			t.Errorf("GET %s: %d %s, want %d", path, got, b, want)
		}
	}
	if code, b := get("/v2/models/echo"); code != 200 || !strings.Contains(b, `"versions":["3"]`) ||
		!strings.Contains(b, `"platform":"tensord/builtin"`) || !strings.Contains(b, `"datatype":"ANY","shape":[-1]`) ||
		!strings.Contains(b, `"limits":{"max_batch":8,"max_bytes":0,"max_pixels":0,"max_tokens":0,"formats":["png"]}`) {
		t.Errorf("metadata: %d %s", code, b)
	}
	if code, b := get("/v2"); code != 200 || !strings.Contains(b, "binary_tensor_data") {
		t.Errorf("server metadata: %d %s", code, b)
	}
	f.notReady = true
	if code, _ := get("/v2/health/ready"); code != 503 {
		t.Errorf("ready without a daemon: %d", code)
	}
	if code, _ := get("/v2/health/live"); code != 200 {
		t.Errorf("live without a daemon: %d", code)
	}
	if code, b := get("/v2/models/echo/ready"); code != 503 || !strings.Contains(b, "not connected") {
		t.Errorf("model ready without a daemon: %d %s", code, b)
	}
	f.notReady = false
	g.draining.Store(true)
	if code, _ := get("/v2/health/ready"); code != 503 {
		t.Errorf("ready while draining: %d", code)
	}
}

func TestTimeoutParameterBoundsTheDeadline(t *testing.T) {
	f := &fakeBackend{}
	srv := httptest.NewServer(newTestGateway(f).routes())
	defer srv.Close()
	body := `{"parameters":{"timeout":250000},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}`
	if resp, b := post(t, srv, "/v2/models/echo/infer", []byte(body), nil); resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	if f.deadline <= 0 || f.deadline > 250*time.Millisecond {
		t.Fatalf("deadline %v, want at most the 250 ms of the timeout parameter", f.deadline)
	}
	body = `{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}`
	post(t, srv, "/v2/models/echo/infer", []byte(body), nil)
	if f.deadline <= 50*time.Second || f.deadline > time.Minute {
		t.Fatalf("deadline %v, want the gateway's -timeout (1 minute)", f.deadline)
	}
}

func TestRESTGzipRequest(t *testing.T) {
	srv := httptest.NewServer(newTestGateway(&fakeBackend{}).routes())
	defer srv.Close()
	var zbuf bytes.Buffer
	zw := newGzip(&zbuf)
	zw.Write([]byte(`{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[42]}]}`))
	zw.Close()
	resp, b := post(t, srv, "/v2/models/echo/infer", zbuf.Bytes(), map[string]string{"Content-Encoding": "gzip"})
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"data":[42]`) {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
}

// ---- gRPC -------------------------------------------------------------------------------

func grpcClient(t *testing.T, g *gateway) pb.GRPCInferenceServiceClient {
	t.Helper()
	return pb.NewGRPCInferenceServiceClient(grpcConnTo(t, g))
}

func grpcConnTo(t *testing.T, g *gateway) *grpc.ClientConn {
	t.Helper()
	ln := bufconn.Listen(1 << 20)
	s := newGRPCServer(g)
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return ln.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestGRPCInferRawAndContents(t *testing.T) {
	f := &fakeBackend{}
	c := grpcClient(t, newTestGateway(f))
	ctx := context.Background()
	raw := make([]byte, 8)
	neg := int64(-7)
	binary.LittleEndian.PutUint64(raw, uint64(neg))
	resp, err := c.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: "echo", Id: "q",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{
			{Name: "x", Datatype: "INT64", Shape: []int64{1}},
			{Name: "w", Datatype: "BYTES", Shape: []int64{2}}},
		RawInputContents: [][]byte{raw, prefixed("ab", "")}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.ModelVersion != "3" || resp.Id != "q" || len(resp.Outputs) != 2 || resp.Outputs[1].Datatype != "BYTES" ||
		!bytes.Equal(resp.RawOutputContents[0], raw) || !bytes.Equal(resp.RawOutputContents[1], prefixed("ab", "")) {
		t.Fatalf("%v", resp)
	}
	resp, err = c.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: "echo",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{2},
			Contents: &pb.InferTensorContents{Fp32Contents: []float32{1.5, 2}}}},
		Outputs: []*pb.ModelInferRequest_InferRequestedOutputTensor{{Name: "y"}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.RawOutputContents[0]; math.Float32frombits(binary.LittleEndian.Uint32(got)) != 1.5 || len(got) != 8 {
		t.Fatalf("%v", resp)
	}
	for _, tc := range []struct {
		req  *pb.ModelInferRequest
		err  error
		code codes.Code
	}{
		{&pb.ModelInferRequest{ModelName: "nope", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1}}}}}, nil, codes.NotFound},
		{&pb.ModelInferRequest{ModelName: "echo", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{2}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1}}}}}, nil, codes.InvalidArgument},
		{&pb.ModelInferRequest{ModelName: "echo", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP16", Shape: []int64{1}}}}, nil, codes.InvalidArgument},
		{&pb.ModelInferRequest{ModelName: "echo", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1}}}, RawInputContents: [][]byte{{1, 2}}}, nil, codes.InvalidArgument},
		{&pb.ModelInferRequest{ModelName: "broken", Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "INT8", Shape: []int64{1}, Contents: &pb.InferTensorContents{IntContents: []int32{1}}}}},
			&shmclient.DaemonError{Code: shmclient.CodeShuttingDown, Name: "SHUTTING_DOWN"}, codes.Unavailable},
	} {
		f.err = tc.err
		_, err := c.ModelInfer(ctx, tc.req)
		if status.Code(err) != tc.code {
			t.Errorf("%v: got %v, want %v", tc.req, err, tc.code)
		}
	}
}

func TestGRPCHealthAndMetadata(t *testing.T) {
	f := &fakeBackend{}
	g := newTestGateway(f)
	c := grpcClient(t, g)
	ctx := context.Background()
	if r, err := c.ServerReady(ctx, &pb.ServerReadyRequest{}); err != nil || !r.Ready {
		t.Fatal(r, err)
	}
	if r, err := c.ModelReady(ctx, &pb.ModelReadyRequest{Name: "nope"}); err != nil || r.Ready {
		t.Fatal(r, err)
	}
	m, err := c.ModelMetadata(ctx, &pb.ModelMetadataRequest{Name: "echo"})
	if err != nil || m.Platform != "tensord/builtin" || m.Versions[0] != "3" || len(m.Outputs) != 2 {
		t.Fatal(m, err)
	}
	f.notReady = true
	if r, _ := c.ServerReady(ctx, &pb.ServerReadyRequest{}); r.Ready {
		t.Fatal("ready without a daemon")
	}
	if r, _ := c.ServerLive(ctx, &pb.ServerLiveRequest{}); !r.Live {
		t.Fatal("not live")
	}
	if _, err := c.ModelMetadata(ctx, &pb.ModelMetadataRequest{Name: "echo"}); status.Code(err) != codes.Unavailable {
		t.Fatal(err)
	}
}

func TestDecodeJSONDataRefusesWhatIsNotData(t *testing.T) {
	for _, raw := range []string{`{"a":1}`, `1`, `[1,2`, `[[1],[2]`, `["1"]`, `[1,,2]`, `[null]`} {
		if _, err := decodeJSONData([]byte(raw), shmclient.F32, 2, "x"); err == nil {
			t.Errorf("%s accepted", raw)
		}
	}
	if _, err := decodeJSONData([]byte(`[1,2,3]`), shmclient.F32, 1<<40, "x"); err == nil {
		t.Error("a shape of 2^40 elements must be refused before allocating")
	}
}

func newGzip(w io.Writer) *gzip.Writer { return gzip.NewWriter(w) }
