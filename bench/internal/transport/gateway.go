package transport

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"google.golang.org/grpc"

	"github.com/tensord/tensord/go/cmd/tensord-gateway/pb"
)

// The tensord-gateway transports: a Go program (or any other) calling a tensord daemon
// through go/cmd/tensord-gateway over the Open Inference Protocol (KServe v2) instead of
// shmclient. The gateway itself holds one tensord session.

const headerLength = "Inference-Header-Content-Length"

// gwHTTPTransport posts KServe v2 requests over a keep-alive pool of one connection per
// caller: JSON numbers (gw-http-json) or Triton's binary tensor extension (gw-http-binary).
type gwHTTPTransport struct {
	client *http.Client
	url    string
	binary bool
}

func openGwHTTP(_ context.Context, cfg Config) (Transport, error) {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        cfg.Callers,
		MaxIdleConnsPerHost: cfg.Callers,
		IdleConnTimeout:     60 * time.Second,
		DisableCompression:  true,
	}
	return &gwHTTPTransport{client: &http.Client{Transport: tr}, url: "http://" + cfg.Addr + "/v2/models/",
		binary: cfg.Kind == GwHTTPBinary}, nil
}

func (t *gwHTTPTransport) NewCaller() (Caller, error) { return &gwHTTPCaller{t: t}, nil }

func (t *gwHTTPTransport) Close() error {
	t.client.CloseIdleConnections()
	return nil
}

type v2Params struct {
	BinaryDataSize   *int64 `json:"binary_data_size,omitempty"`
	BinaryDataOutput *bool  `json:"binary_data_output,omitempty"`
}

type v2Tensor struct {
	Name       string    `json:"name"`
	Datatype   string    `json:"datatype"`
	Shape      []int64   `json:"shape"`
	Parameters *v2Params `json:"parameters,omitempty"`
	Data       []float32 `json:"data,omitempty"`
}

type v2Request struct {
	Inputs     []v2Tensor `json:"inputs"`
	Parameters *v2Params  `json:"parameters,omitempty"`
}

type v2Response struct {
	Outputs []v2Tensor `json:"outputs"`
	Error   string     `json:"error"`
}

type gwHTTPCaller struct {
	t    *gwHTTPTransport
	out  bytes.Buffer
	in   bytes.Buffer
	resp v2Response
}

func (c *gwHTTPCaller) Close() error { return nil }

func (c *gwHTTPCaller) Call(ctx context.Context, p *Payload) error {
	if err := p.needF32(GwHTTPJSON); err != nil {
		return err
	}
	c.out.Reset()
	in := v2Tensor{Name: p.Input, Datatype: "FP32", Shape: p.Shape}
	var req v2Request
	if c.t.binary {
		n, yes := int64(len(p.Data)), true
		in.Parameters = &v2Params{BinaryDataSize: &n}
		req = v2Request{Inputs: []v2Tensor{in}, Parameters: &v2Params{BinaryDataOutput: &yes}}
	} else {
		in.Data = p.Floats
		req = v2Request{Inputs: []v2Tensor{in}}
	}
	if err := json.NewEncoder(&c.out).Encode(req); err != nil {
		return err
	}
	hlen := c.out.Len()
	if c.t.binary {
		c.out.Write(p.Data)
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, c.t.url+p.Model+"/infer", bytes.NewReader(c.out.Bytes()))
	if err != nil {
		return err
	}
	if c.t.binary {
		hr.Header.Set(headerLength, strconv.Itoa(hlen))
		hr.Header.Set("Content-Type", "application/octet-stream")
	} else {
		hr.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.t.client.Do(hr)
	if err != nil {
		return err
	}
	c.in.Reset()
	_, err = c.in.ReadFrom(resp.Body)
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("HTTP %d: reading the response: %w", resp.StatusCode, err)
	}
	body := c.in.Bytes()
	header, rest := body, []byte(nil)
	if v := resp.Header.Get(headerLength); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > len(body) {
			return fmt.Errorf("HTTP %d: %s %q", resp.StatusCode, headerLength, v)
		}
		header, rest = body[:n], body[n:]
	}
	c.resp = v2Response{}
	if err := json.Unmarshal(header, &c.resp); err != nil {
		return fmt.Errorf("HTTP %d: decoding the response: %w", resp.StatusCode, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, c.resp.Error)
	}
	if len(c.resp.Outputs) != 1 {
		return fmt.Errorf("%d outputs, want 1", len(c.resp.Outputs))
	}
	o := c.resp.Outputs[0]
	if o.Datatype != "FP32" {
		return fmt.Errorf("output datatype %q, want FP32", o.Datatype)
	}
	if c.t.binary {
		if o.Parameters == nil || o.Parameters.BinaryDataSize == nil || *o.Parameters.BinaryDataSize != int64(len(rest)) {
			return fmt.Errorf("binary output: binary_data_size does not match the %d bytes after the header", len(rest))
		}
		return p.CheckBytes(o.Shape, rest)
	}
	return p.CheckFloats(o.Shape, o.Data)
}

// gwGRPCTransport is one gRPC channel to the gateway's KServe v2 service over a Unix socket,
// shared by all callers (as grpc-uds is to the grpcio server).
type gwGRPCTransport struct {
	conn   *grpc.ClientConn
	client pb.GRPCInferenceServiceClient
}

func openGwGRPC(_ context.Context, cfg Config) (Transport, error) {
	conn, err := dialUnixGRPC(cfg.Addr)
	if err != nil {
		return nil, err
	}
	return &gwGRPCTransport{conn: conn, client: pb.NewGRPCInferenceServiceClient(conn)}, nil
}

func (t *gwGRPCTransport) NewCaller() (Caller, error) { return &gwGRPCCaller{t: t}, nil }
func (t *gwGRPCTransport) Close() error               { return t.conn.Close() }

type gwGRPCCaller struct{ t *gwGRPCTransport }

func (c *gwGRPCCaller) Close() error { return nil }

func (c *gwGRPCCaller) Call(ctx context.Context, p *Payload) error {
	if err := p.needF32(GwGRPC); err != nil {
		return err
	}
	resp, err := c.t.client.ModelInfer(ctx, &pb.ModelInferRequest{
		ModelName:        p.Model,
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: p.Input, Datatype: "FP32", Shape: p.Shape}},
		RawInputContents: [][]byte{p.Data},
	}, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	if len(resp.Outputs) != 1 || len(resp.RawOutputContents) != 1 {
		return fmt.Errorf("%d outputs with %d buffers, want 1", len(resp.Outputs), len(resp.RawOutputContents))
	}
	if dt := resp.Outputs[0].Datatype; dt != "FP32" {
		return fmt.Errorf("output datatype %q, want FP32", dt)
	}
	return p.CheckBytes(resp.Outputs[0].Shape, resp.RawOutputContents[0])
}
