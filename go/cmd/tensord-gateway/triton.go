package main

import (
	"context"
	"net/http"
	"sort"
	"strconv"

	"github.com/tensord/tensord/go/cmd/tensord-gateway/pb"
	"github.com/tensord/tensord/go/shmclient"
)

// Triton's model configuration and statistics extensions (what tritonclient's
// get_model_config and get_inference_statistics ask for), built from the daemon's model
// metadata and scheduling counters (SPEC §2.4 model info, model_stats). configOf and
// statistics build both; HTTP writes what they build as JSON, gRPC copies it into Triton's
// messages (configProto, statProto), so the two front ends cannot say different things.

type configTensorJSON struct {
	Name     string  `json:"name"`
	DataType string  `json:"data_type"` // Triton's TYPE_FP32, ...
	Dims     []int64 `json:"dims"`
}

type modelConfigJSON struct {
	Name         string               `json:"name"`
	Platform     string               `json:"platform"`
	Backend      string               `json:"backend"`
	MaxBatchSize int32                `json:"max_batch_size"`
	Input        []configTensorJSON   `json:"input"`
	Output       []configTensorJSON   `json:"output"`
	Parameters   map[string]paramJSON `json:"parameters"`
}

type paramJSON struct {
	StringValue string `json:"string_value"`
}

func configTensors(specs []shmclient.TensorSpec) []configTensorJSON {
	out := make([]configTensorJSON, len(specs))
	for i, s := range specs {
		dims := s.Shape
		if dims == nil {
			dims = []int64{-1}
		}
		out[i] = configTensorJSON{Name: s.Name, DataType: "TYPE_" + tritonTypeName(s.DType), Dims: dims}
	}
	return out
}

// tritonTypeName is the protocol's datatype as Triton's config names it (TYPE_ + it),
// except BYTES, which Triton's config calls STRING.
func tritonTypeName(d shmclient.DType) string {
	switch n := datatypeName(d); n {
	case "BYTES":
		return "STRING"
	case "ANY":
		return "INVALID" // any dtype: Triton has no word for it
	default:
		return n
	}
}

// modelConfig answers GET /v2/models/{name}[/versions/{v}]/config.
func (g *gateway) modelConfig(w http.ResponseWriter, r *http.Request) {
	m, err := g.model(r.Context(), r.PathValue("name"), r.PathValue("version"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, configOf(m))
}

// configOf is a model's configuration as Triton describes one. Dims are given in full, the
// batch dimension included, with max_batch_size 0 (Triton's way of saying so); what Triton
// has no field for (the device, idempotence, the limits) is in parameters.
func configOf(m *shmclient.ModelInfo) modelConfigJSON {
	return modelConfigJSON{
		Name: m.Name, Platform: platform(m), Backend: "tensord", MaxBatchSize: 0,
		Input: configTensors(m.Inputs), Output: configTensors(m.Outputs),
		Parameters: map[string]paramJSON{"device": {m.Device},
			"idempotent":        {strconv.FormatBool(m.Idempotent)},
			"limits.max_batch":  {strconv.FormatUint(m.Limits.MaxBatch, 10)},
			"limits.max_bytes":  {strconv.FormatUint(m.Limits.MaxBytes, 10)},
			"limits.max_pixels": {strconv.FormatUint(m.Limits.MaxPixels, 10)}},
	}
}

type durationStatJSON struct {
	Count uint64 `json:"count"`
	NS    uint64 `json:"ns"`
}

type inferStatsJSON struct {
	Success      durationStatJSON `json:"success"`
	Fail         durationStatJSON `json:"fail"`
	Queue        durationStatJSON `json:"queue"`
	ComputeInput durationStatJSON `json:"compute_input"`
	ComputeInfer durationStatJSON `json:"compute_infer"`
	ComputeOut   durationStatJSON `json:"compute_output"`
	CacheHit     durationStatJSON `json:"cache_hit"`
	CacheMiss    durationStatJSON `json:"cache_miss"`
}

type batchStatJSON struct {
	BatchSize    uint64           `json:"batch_size"`
	ComputeInput durationStatJSON `json:"compute_input"`
	ComputeInfer durationStatJSON `json:"compute_infer"`
	ComputeOut   durationStatJSON `json:"compute_output"`
}

type modelStatJSON struct {
	Name           string          `json:"name"`
	Version        string          `json:"version"`
	LastInference  uint64          `json:"last_inference"`
	InferenceCount uint64          `json:"inference_count"`
	ExecutionCount uint64          `json:"execution_count"`
	InferenceStats inferStatsJSON  `json:"inference_stats"`
	BatchStats     []batchStatJSON `json:"batch_stats"`
}

type statsJSON struct {
	ModelStats []modelStatJSON `json:"model_stats"`
}

// modelStats answers GET /v2/models[/{name}[/versions/{v}]]/stats.
func (g *gateway) modelStats(w http.ResponseWriter, r *http.Request) {
	st, err := g.statistics(r.Context(), r.PathValue("name"), r.PathValue("version"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, statsJSON{ModelStats: st})
}

// statistics are one model's counters (name and version as the request gives them: an
// unknown one is not found), or every model's when name is "".
func (g *gateway) statistics(ctx context.Context, name, version string) ([]modelStatJSON, error) {
	if name != "" {
		if _, err := g.model(ctx, name, version); err != nil {
			return nil, err
		}
	} else if !g.ready() {
		return nil, errNotReady
	}
	all, err := g.b.Stats(ctx)
	if err != nil {
		return nil, err
	}
	out := []modelStatJSON{}
	for _, s := range all {
		if name != "" && s.Name != name {
			continue
		}
		out = append(out, statJSON(s))
	}
	return out, nil
}

// statJSON is a model's counters as Triton's statistics. tensord counts per request and per
// forward pass, not per stage: compute_infer holds the forward passes' time (spread over the
// passes of each batch size in proportion to the requests they joined), queue the time
// requests waited, fail the requests answered with an error (the model's, a full queue, an
// expired deadline), with no time.
func statJSON(s shmclient.ModelStats) modelStatJSON {
	queueNS := uint64(s.QueueTime.Nanoseconds())
	computeNS := uint64(s.ComputeTime.Nanoseconds())
	failed := s.Failed + s.Rejected + s.Expired
	st := modelStatJSON{Name: s.Name, Version: strconv.FormatUint(s.Version, 10),
		InferenceCount: s.Served, ExecutionCount: s.Batches, BatchStats: []batchStatJSON{},
		InferenceStats: inferStatsJSON{
			Success:      durationStatJSON{Count: s.Served, NS: queueNS + computeNS},
			Fail:         durationStatJSON{Count: failed},
			Queue:        durationStatJSON{Count: s.Served + s.Failed, NS: queueNS},
			ComputeInfer: durationStatJSON{Count: s.Served + s.Failed, NS: computeNS}}}
	sizes := make([]int, 0, len(s.BatchSizes))
	var requests uint64
	for size, n := range s.BatchSizes {
		sizes = append(sizes, size)
		requests += uint64(size) * n
	}
	sort.Ints(sizes)
	for _, size := range sizes {
		n := s.BatchSizes[size]
		var ns uint64
		if requests > 0 {
			ns = uint64(float64(computeNS) * float64(uint64(size)*n) / float64(requests))
		}
		st.BatchStats = append(st.BatchStats, batchStatJSON{BatchSize: uint64(size),
			ComputeInfer: durationStatJSON{Count: n, NS: ns}})
	}
	return st
}

// ---- the same as Triton's gRPC messages ---------------------------------------------------

func configProto(c modelConfigJSON) *pb.ModelConfig {
	out := &pb.ModelConfig{Name: c.Name, Platform: c.Platform, Backend: c.Backend,
		MaxBatchSize: c.MaxBatchSize, Parameters: make(map[string]*pb.ModelParameter, len(c.Parameters))}
	for _, t := range c.Input {
		out.Input = append(out.Input, &pb.ModelInput{Name: t.Name, DataType: dataTypeProto(t.DataType), Dims: t.Dims})
	}
	for _, t := range c.Output {
		out.Output = append(out.Output, &pb.ModelOutput{Name: t.Name, DataType: dataTypeProto(t.DataType), Dims: t.Dims})
	}
	for k, v := range c.Parameters {
		out.Parameters[k] = &pb.ModelParameter{StringValue: v.StringValue}
	}
	return out
}

// dataTypeProto is the enum value of a config datatype (TYPE_FP32, ...); configTensors
// only writes names the enum has.
func dataTypeProto(name string) pb.DataType {
	return pb.DataType(pb.DataType_value[name])
}

func durationProto(d durationStatJSON) *pb.StatisticDuration {
	return &pb.StatisticDuration{Count: d.Count, Ns: d.NS}
}

func statProto(s modelStatJSON) *pb.ModelStatistics {
	i := s.InferenceStats
	out := &pb.ModelStatistics{Name: s.Name, Version: s.Version, LastInference: s.LastInference,
		InferenceCount: s.InferenceCount, ExecutionCount: s.ExecutionCount,
		InferenceStats: &pb.InferStatistics{Success: durationProto(i.Success), Fail: durationProto(i.Fail),
			Queue: durationProto(i.Queue), ComputeInput: durationProto(i.ComputeInput),
			ComputeInfer: durationProto(i.ComputeInfer), ComputeOutput: durationProto(i.ComputeOut),
			CacheHit: durationProto(i.CacheHit), CacheMiss: durationProto(i.CacheMiss)}}
	for _, b := range s.BatchStats {
		out.BatchStats = append(out.BatchStats, &pb.InferBatchStatistics{BatchSize: b.BatchSize,
			ComputeInput: durationProto(b.ComputeInput), ComputeInfer: durationProto(b.ComputeInfer),
			ComputeOutput: durationProto(b.ComputeOut)})
	}
	return out
}
