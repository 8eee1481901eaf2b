package main

import (
	"context"
	"encoding/binary"
	"math"
	"strconv"
	"time"

	"github.com/tensord/tensord/go/cmd/tensord-gateway/pb"
	"github.com/tensord/tensord/go/shmclient"
	"google.golang.org/grpc/status"
)

const deadlineMargin = 5 * time.Millisecond

// grpcService is the Open Inference Protocol's gRPC service (inference.GRPCInferenceService).
type grpcService struct {
	pb.UnimplementedGRPCInferenceServiceServer
	g *gateway
}

func grpcError(err error) error {
	_, code := errorStatus(err)
	return status.Error(code, err.Error())
}

func (s *grpcService) ServerLive(context.Context, *pb.ServerLiveRequest) (*pb.ServerLiveResponse, error) {
	return &pb.ServerLiveResponse{Live: true}, nil
}

func (s *grpcService) ServerReady(context.Context, *pb.ServerReadyRequest) (*pb.ServerReadyResponse, error) {
	return &pb.ServerReadyResponse{Ready: s.g.ready()}, nil
}

func (s *grpcService) ModelReady(ctx context.Context, r *pb.ModelReadyRequest) (*pb.ModelReadyResponse, error) {
	_, err := s.g.model(ctx, r.GetName(), r.GetVersion())
	return &pb.ModelReadyResponse{Ready: err == nil}, nil
}

func (s *grpcService) ServerMetadata(context.Context, *pb.ServerMetadataRequest) (*pb.ServerMetadataResponse, error) {
	return &pb.ServerMetadataResponse{Name: "tensord-gateway", Version: gatewayVersion, Extensions: []string{"binary_tensor_data"}}, nil
}

func grpcTensorsMetadata(specs []shmclient.TensorSpec) []*pb.ModelMetadataResponse_TensorMetadata {
	out := make([]*pb.ModelMetadataResponse_TensorMetadata, len(specs))
	for i, t := range tensorsMetadata(specs) {
		out[i] = &pb.ModelMetadataResponse_TensorMetadata{Name: t.Name, Datatype: t.Datatype, Shape: t.Shape}
	}
	return out
}

func (s *grpcService) ModelMetadata(ctx context.Context, r *pb.ModelMetadataRequest) (*pb.ModelMetadataResponse, error) {
	m, err := s.g.model(ctx, r.GetName(), r.GetVersion())
	if err != nil {
		return nil, grpcError(err)
	}
	return &pb.ModelMetadataResponse{Name: m.Name, Versions: []string{strconv.FormatUint(m.Version, 10)},
		Platform: platform(m), Inputs: grpcTensorsMetadata(m.Inputs), Outputs: grpcTensorsMetadata(m.Outputs)}, nil
}

// ModelConfig is Triton's model configuration extension: what GET .../config answers.
func (s *grpcService) ModelConfig(ctx context.Context, r *pb.ModelConfigRequest) (*pb.ModelConfigResponse, error) {
	m, err := s.g.model(ctx, r.GetName(), r.GetVersion())
	if err != nil {
		return nil, grpcError(err)
	}
	return &pb.ModelConfigResponse{Config: configProto(configOf(m))}, nil
}

// ModelStatistics is Triton's statistics extension: what GET .../stats answers.
func (s *grpcService) ModelStatistics(ctx context.Context, r *pb.ModelStatisticsRequest) (*pb.ModelStatisticsResponse, error) {
	st, err := s.g.statistics(ctx, r.GetName(), r.GetVersion())
	if err != nil {
		return nil, grpcError(err)
	}
	out := &pb.ModelStatisticsResponse{ModelStats: make([]*pb.ModelStatistics, len(st))}
	for i, m := range st {
		out.ModelStats[i] = statProto(m)
	}
	return out, nil
}

func (s *grpcService) ModelInfer(ctx context.Context, r *pb.ModelInferRequest) (*pb.ModelInferResponse, error) {
	req, err := grpcRequest(r)
	if err != nil {
		return nil, grpcError(err)
	}
	if dl, ok := ctx.Deadline(); ok {
		// Answer DEADLINE_EXCEEDED a moment before the deadline: at the deadline itself
		// the transport resets the stream, which the caller may see as CANCELLED instead.
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-deadlineMargin))
		defer cancel()
	}
	res, err := s.g.infer(ctx, req)
	if err != nil {
		return nil, grpcError(err)
	}
	resp := &pb.ModelInferResponse{ModelName: req.model, ModelVersion: res.version, Id: req.id}
	// One block holds every output's bytes, copied out of shared memory before the views
	// are released (gRPC sends the message after this returns).
	size := 0
	for _, t := range res.outputs {
		size += len(t.Data)
	}
	block := make([]byte, 0, size)
	for _, t := range res.outputs {
		start := len(block)
		if t.DType == shmclient.Bytes {
			if block, err = appendPrefixed(block, t); err != nil {
				res.release()
				return nil, grpcError(err)
			}
		} else {
			block = append(block, t.Data...)
		}
		resp.Outputs = append(resp.Outputs, &pb.ModelInferResponse_InferOutputTensor{
			Name: t.Name, Datatype: datatypeName(t.DType), Shape: append([]int64(nil), t.Shape...)})
		resp.RawOutputContents = append(resp.RawOutputContents, block[start:len(block):len(block)])
	}
	res.release()
	return resp, nil
}

func grpcRequest(r *pb.ModelInferRequest) (*inferRequest, error) {
	req := &inferRequest{model: r.GetModelName(), version: r.GetModelVersion(), id: r.GetId()}
	if p, ok := r.GetParameters()["timeout"]; ok {
		us := p.GetInt64Param()
		if us == 0 {
			us = int64(min(p.GetUint64Param(), math.MaxInt64))
		}
		d, err := timeoutParam(us)
		if err != nil {
			return nil, err
		}
		req.timeout = d
	}
	raw := r.GetRawInputContents()
	if len(raw) > 0 && len(raw) != len(r.GetInputs()) {
		return nil, badRequest("%d raw_input_contents for %d inputs: give one per input, or none", len(raw), len(r.GetInputs()))
	}
	if len(r.GetInputs()) == 0 {
		return nil, badRequest("the request has no inputs")
	}
	for i, in := range r.GetInputs() {
		d, err := parseDatatype(in.GetName(), in.GetDatatype())
		if err != nil {
			return nil, err
		}
		n, err := numElements(in.GetName(), in.GetShape())
		if err != nil {
			return nil, err
		}
		t := shmclient.Tensor{Name: in.GetName(), DType: d, Shape: in.GetShape()}
		switch {
		case len(raw) > 0 && d == shmclient.Bytes:
			t.Data, err = bytesFromPrefixed(nil, raw[i], n, t.Name)
		case len(raw) > 0:
			t.Data, err = raw[i], checkNumeric(t.Name, d, n, raw[i])
		default:
			t.Data, err = fromContents(in.GetContents(), d, n, t.Name)
		}
		if err != nil {
			return nil, err
		}
		req.inputs = append(req.inputs, t)
	}
	for _, o := range r.GetOutputs() {
		req.outputs = append(req.outputs, requestedOutput{name: o.GetName()})
	}
	return req, nil
}

// fromContents is tensord's layout of typed contents (InferTensorContents).
func fromContents(c *pb.InferTensorContents, d shmclient.DType, n int64, name string) ([]byte, error) {
	count := func(have int) error {
		if int64(have) != n {
			return badRequest("input %q: %d %s contents, its shape has %d elements", name, have, datatypeName(d), n)
		}
		return nil
	}
	var out []byte // n comes from the caller: never allocate by it
	switch d {
	case shmclient.Bool:
		v := c.GetBoolContents()
		for _, x := range v {
			out = append(out, b2u(x))
		}
		return out, count(len(v))
	case shmclient.U8:
		v := c.GetUintContents()
		for _, x := range v {
			if x > math.MaxUint8 {
				return nil, badRequest("input %q: %d does not fit UINT8", name, x)
			}
			out = append(out, byte(x))
		}
		return out, count(len(v))
	case shmclient.I8, shmclient.I16, shmclient.I32:
		v := c.GetIntContents()
		bits := d.Size() * 8
		for _, x := range v {
			if x < -(1<<(bits-1)) || x >= 1<<(bits-1) {
				return nil, badRequest("input %q: %d does not fit %s", name, x, datatypeName(d))
			}
			switch d {
			case shmclient.I8:
				out = append(out, byte(x))
			case shmclient.I16:
				out = binary.LittleEndian.AppendUint16(out, uint16(x))
			default:
				out = binary.LittleEndian.AppendUint32(out, uint32(x))
			}
		}
		return out, count(len(v))
	case shmclient.I64:
		v := c.GetInt64Contents()
		for _, x := range v {
			out = binary.LittleEndian.AppendUint64(out, uint64(x))
		}
		return out, count(len(v))
	case shmclient.F32:
		v := c.GetFp32Contents()
		for _, x := range v {
			out = binary.LittleEndian.AppendUint32(out, math.Float32bits(x))
		}
		return out, count(len(v))
	case shmclient.F64:
		v := c.GetFp64Contents()
		for _, x := range v {
			out = binary.LittleEndian.AppendUint64(out, math.Float64bits(x))
		}
		return out, count(len(v))
	case shmclient.Bytes:
		v := c.GetBytesContents()
		if err := count(len(v)); err != nil {
			return nil, err
		}
		return bytesFromStrings(nil, v), nil
	}
	return nil, badRequest("input %q: %s data has no contents field in the protocol; send it in raw_input_contents", name, datatypeName(d))
}

func b2u(b bool) byte {
	if b {
		return 1
	}
	return 0
}
