package transport

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tensord/tensord/bench/internal/pb"
)

// maxMessage lifts gRPC's default 4 MiB message limit, which would refuse large tensors;
// the server sets the same.
const maxMessage = 1 << 30

// grpcTransport is one gRPC channel (HTTP/2 connection) over a Unix socket, shared by all
// callers as gRPC recommends (streams multiplex on it).
type grpcTransport struct {
	conn   *grpc.ClientConn
	client pb.InferenceClient
}

func openGRPC(ctx context.Context, cfg Config) (Transport, error) {
	conn, err := dialUnixGRPC(cfg.Addr)
	if err != nil {
		return nil, err
	}
	return &grpcTransport{conn: conn, client: pb.NewInferenceClient(conn)}, nil
}

// dialUnixGRPC opens one gRPC channel over a Unix socket, with message limits raised to
// maxMessage on both sides (gRPC's 4 MiB default refuses large tensors).
func dialUnixGRPC(addr string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)))
	if err != nil {
		return nil, err
	}
	conn.Connect()
	return conn, nil
}

func (t *grpcTransport) NewCaller() (Caller, error) { return &grpcCaller{t: t}, nil }
func (t *grpcTransport) Close() error               { return t.conn.Close() }

type grpcCaller struct{ t *grpcTransport }

func (c *grpcCaller) Close() error { return nil }

func (c *grpcCaller) Call(ctx context.Context, p *Payload) error {
	if err := p.needF32(GRPC); err != nil {
		return err
	}
	resp, err := c.t.client.Infer(ctx, &pb.InferRequest{
		Model:            p.Model,
		Inputs:           []*pb.TensorMeta{{Name: "x", Datatype: "f32", Shape: p.Shape}},
		RawInputContents: [][]byte{p.Data},
	}, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	if len(resp.Outputs) != 1 || len(resp.RawOutputContents) != 1 {
		return fmt.Errorf("%d outputs with %d buffers, want 1", len(resp.Outputs), len(resp.RawOutputContents))
	}
	if dt := resp.Outputs[0].Datatype; dt != "f32" {
		return fmt.Errorf("output dtype %q, want f32", dt)
	}
	return p.CheckBytes(resp.Outputs[0].Shape, resp.RawOutputContents[0])
}
