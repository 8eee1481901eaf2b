package main

import (
	"context"
	"sync"

	"github.com/tensord/tensord/go/cmd/tensord-gateway/pb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// A message that is not valid protobuf is the caller's mistake, INVALID_ARGUMENT; grpc-go
// answers INTERNAL for any codec error (it wraps them itself). So the gateway's codec
// never fails to decode: it notes the message it could not fill, and the interceptor, which
// sees the message before the method does, answers INVALID_ARGUMENT for it.

var protoCodec = encoding.GetCodecV2(proto.Name)

// undecodable holds the request messages the codec could not fill, until the interceptor
// takes them (one call each).
var undecodable sync.Map // message pointer -> error

type lenientCodec struct{}

func (lenientCodec) Name() string { return proto.Name }

func (lenientCodec) Marshal(v any) (mem.BufferSlice, error) { return protoCodec.Marshal(v) }

func (lenientCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if err := protoCodec.Unmarshal(data, v); err != nil {
		undecodable.Store(v, err)
	}
	return nil
}

// newGRPCServer is the gRPC front end of g: messages up to -max-body, and undecodable
// ones answered INVALID_ARGUMENT.
func newGRPCServer(g *gateway) *grpc.Server {
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(int(g.maxBody)), grpc.MaxSendMsgSize(int(g.maxBody)),
		grpc.ForceServerCodecV2(lenientCodec{}), grpc.UnaryInterceptor(refuseUndecodable))
	pb.RegisterGRPCInferenceServiceServer(gs, &grpcService{g: g})
	return gs
}

// refuseUndecodable answers INVALID_ARGUMENT for a request the codec could not decode.
func refuseUndecodable(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err, ok := undecodable.LoadAndDelete(req); ok {
		return nil, status.Errorf(codes.InvalidArgument, "tensord-gateway: %s: the request is not a valid protobuf message: %v", info.FullMethod, err)
	}
	return handler(ctx, req)
}
