package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tensord/tensord/go/cmd/tensord-gateway/pb"
	"github.com/tensord/tensord/go/shmclient"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

func TestConfigProtoNamesEveryDatatypeAsTriton(t *testing.T) {
	want := map[shmclient.DType]pb.DataType{
		shmclient.Bool: pb.DataType_TYPE_BOOL, shmclient.U8: pb.DataType_TYPE_UINT8,
		shmclient.I8: pb.DataType_TYPE_INT8, shmclient.I16: pb.DataType_TYPE_INT16,
		shmclient.I32: pb.DataType_TYPE_INT32, shmclient.I64: pb.DataType_TYPE_INT64,
		shmclient.F16: pb.DataType_TYPE_FP16, shmclient.BF16: pb.DataType_TYPE_BF16,
		shmclient.F32: pb.DataType_TYPE_FP32, shmclient.F64: pb.DataType_TYPE_FP64,
		shmclient.Bytes: pb.DataType_TYPE_STRING, shmclient.AnyDType: pb.DataType_TYPE_INVALID,
	}
	if len(want) != len(datatypes)+1 {
		t.Fatalf("the test knows %d datatypes, the gateway %d (+ any)", len(want), len(datatypes))
	}
	var m shmclient.ModelInfo
	for d := range want {
		m.Inputs = append(m.Inputs, shmclient.TensorSpec{Name: d.String(), DType: d, Shape: []int64{-1, int64(d)}})
	}
	m.Outputs = []shmclient.TensorSpec{{Name: "anything", DType: shmclient.AnyDType}} // any rank
	c := configProto(configOf(&m))
	for i, in := range c.Input {
		d := m.Inputs[i].DType
		if in.Name != d.String() || in.DataType != want[d] || !slices.Equal(in.Dims, []int64{-1, int64(d)}) {
			t.Errorf("%v: %v, want %v", d, in, want[d])
		}
	}
	if len(c.Output) != 1 || c.Output[0].DataType != pb.DataType_TYPE_INVALID || !slices.Equal(c.Output[0].Dims, []int64{-1}) {
		t.Errorf("output: %v", c.Output)
	}
}

func TestGRPCModelConfigAndStatistics(t *testing.T) {
	f := &fakeBackend{}
	c := grpcClient(t, newTestGateway(f))
	ctx := context.Background()

	r, err := c.ModelConfig(ctx, &pb.ModelConfigRequest{Name: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	cfg := r.GetConfig()
	if cfg.Name != "echo" || cfg.Platform != "tensord/builtin" || cfg.Backend != "tensord" || cfg.MaxBatchSize != 0 ||
		len(cfg.Input) != 1 || cfg.Input[0].Name != "x" || cfg.Input[0].DataType != pb.DataType_TYPE_INVALID ||
		!slices.Equal(cfg.Input[0].Dims, []int64{-1}) || len(cfg.Output) != 2 || cfg.Output[1].Name != "z" ||
		cfg.Parameters["device"].GetStringValue() != "cpu" || cfg.Parameters["limits.max_batch"].GetStringValue() != "8" {
		t.Fatalf("config: %v", cfg)
	}

	// The fake's counters: 10 served, 1 failed, 2 rejected; 4 passes, two of 1 request and
	// two of 4; 5 ms queued, 10 ms computing.
	s, err := c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{Name: "echo", Version: "3"})
	if err != nil {
		t.Fatal(err)
	}
	ms := oneModel(t, s)
	inf := ms.InferenceStats
	ns := func(d time.Duration) uint64 { return uint64(d.Nanoseconds()) }
	for _, tc := range []struct {
		what  string
		got   *pb.StatisticDuration
		count uint64
		ns    uint64
	}{
		{"success", inf.Success, 10, ns(15 * time.Millisecond)},
		{"fail", inf.Fail, 3, 0},
		{"queue", inf.Queue, 11, ns(5 * time.Millisecond)},
		{"compute_infer", inf.ComputeInfer, 11, ns(10 * time.Millisecond)},
		{"compute_input", inf.ComputeInput, 0, 0},
		{"batch 1", ms.BatchStats[0].ComputeInfer, 2, ns(2 * time.Millisecond)},
		{"batch 4", ms.BatchStats[1].ComputeInfer, 2, ns(8 * time.Millisecond)},
	} {
		if tc.got.GetCount() != tc.count || tc.got.GetNs() != tc.ns {
			t.Errorf("%s: %v, want count %d ns %d", tc.what, tc.got, tc.count, tc.ns)
		}
	}
	if ms.Name != "echo" || ms.Version != "3" || ms.InferenceCount != 10 || ms.ExecutionCount != 4 ||
		len(ms.BatchStats) != 2 || ms.BatchStats[0].BatchSize != 1 || ms.BatchStats[1].BatchSize != 4 {
		t.Fatalf("stats: %v", ms)
	}
	if all, err := c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{}); err != nil || len(all.ModelStats) != 1 {
		t.Fatalf("every model's stats: %v %v", all, err)
	}

	for _, tc := range []struct {
		call func() error
		code codes.Code
		says string
	}{
		{func() error { _, err := c.ModelConfig(ctx, &pb.ModelConfigRequest{Name: "nope"}); return err }, codes.NotFound, `"nope"`},
		{func() error { _, err := c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{Name: "nope"}); return err }, codes.NotFound, `"nope"`},
		{func() error {
			_, err := c.ModelConfig(ctx, &pb.ModelConfigRequest{Name: "echo", Version: "2"})
			return err
		}, codes.NotFound, "version 2 is not served"},
		{func() error {
			f.notReady = true
			_, err := c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{})
			return err
		}, codes.Unavailable, "not connected"},
		{func() error { _, err := c.ModelConfig(ctx, &pb.ModelConfigRequest{Name: "echo"}); return err }, codes.Unavailable, "not connected"},
	} {
		err := tc.call()
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.says) {
			t.Errorf("got %v, want %v saying %q", err, tc.code, tc.says)
		}
	}
}

func oneModel(t *testing.T, s *pb.ModelStatisticsResponse) *pb.ModelStatistics {
	t.Helper()
	if len(s.GetModelStats()) != 1 {
		t.Fatalf("want one model's stats: %v", s)
	}
	return s.ModelStats[0]
}

// Both front ends answer from the same code: the HTTP JSON, read as Triton's messages
// (protojson, which takes the proto field names and enum names Triton's JSON uses, and
// refuses a field the message does not have), is what gRPC answers.
func TestHTTPAndGRPCSayTheSame(t *testing.T) {
	g := newTestGateway(&fakeBackend{})
	srv := httptest.NewServer(g.routes())
	defer srv.Close()
	c := grpcClient(t, g)
	ctx := context.Background()
	get := func(path string, into proto.Message) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if err := protojson.Unmarshal(b, into); err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %d %v: %s", path, resp.StatusCode, err, b)
		}
	}

	var cfg pb.ModelConfig
	get("/v2/models/echo/config", &cfg)
	r, err := c.ModelConfig(ctx, &pb.ModelConfigRequest{Name: "echo"})
	if err != nil || !proto.Equal(&cfg, r.Config) {
		t.Fatalf("HTTP %v\ngRPC %v %v", &cfg, r.GetConfig(), err)
	}
	var st pb.ModelStatisticsResponse
	get("/v2/models/stats", &st)
	s, err := c.ModelStatistics(ctx, &pb.ModelStatisticsRequest{})
	if err != nil || !proto.Equal(&st, s) || len(s.ModelStats) != 1 {
		t.Fatalf("HTTP %v\ngRPC %v %v", &st, s, err)
	}
}
