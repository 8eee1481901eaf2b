package transport

import (
	"context"
	"fmt"
	"math/bits"

	"github.com/tensord/tensord/go/shmclient"
)

// shmTransport is one tensord session (one shmclient.Client) shared by all its callers,
// the way the shmclient docs ask Go programs to use it.
type shmTransport struct {
	c        *shmclient.Client
	zeroCopy bool
}

const maxRing = 512 << 20

// ringFor sizes a ring so that `callers` records of `payload` bytes fit at once (capped;
// beyond the cap callers wait for ring space, which is the protocol's back-pressure).
func ringFor(payload, callers int) int {
	one := payload + 4096
	need := one * callers
	if need > maxRing {
		need = max(maxRing, one)
	}
	if need < 1<<16 {
		need = 1 << 16
	}
	return 1 << bits.Len(uint(need-1))
}

func openShm(ctx context.Context, cfg Config) (Transport, error) {
	ring := ringFor(cfg.MaxPayload, cfg.Callers)
	c, err := shmclient.Dial(ctx, cfg.Addr,
		shmclient.WithSpin(cfg.Spin),
		shmclient.WithRingSize(ring, ring),
		shmclient.WithName("tensord-bench"))
	if err != nil {
		return nil, err
	}
	return &shmTransport{c: c, zeroCopy: cfg.Kind == ShmZeroCopy}, nil
}

func (t *shmTransport) NewCaller() (Caller, error) {
	return &shmCaller{t: t}, nil
}

func (t *shmTransport) Close() error { return t.c.Close() }

type shmCaller struct{ t *shmTransport }

func (c *shmCaller) Close() error { return nil }

func (c *shmCaller) Call(ctx context.Context, p *Payload) error {
	if c.t.zeroCopy {
		return c.callZeroCopy(ctx, p)
	}
	out, err := c.t.c.Infer(ctx, p.Model, shmclient.Tensor{Name: "x", DType: shmclient.F32, Shape: p.Shape, Data: p.Data})
	if err != nil {
		return err
	}
	if len(out) != 1 {
		return fmt.Errorf("%d outputs, want 1", len(out))
	}
	return p.CheckBytes(out[0].Shape, out[0].Data)
}

// callZeroCopy reserves the request record, writes the input straight into shared memory
// (the one copy any producer pays: it has to put its numbers somewhere), and checks the
// output where it lies in the response ring, releasing it afterwards.
func (c *shmCaller) callZeroCopy(ctx context.Context, p *Payload) error {
	req, err := c.t.c.NewRequest(ctx, p.Model, shmclient.TensorSpec{Name: "x", DType: shmclient.F32, Shape: p.Shape})
	if err != nil {
		return err
	}
	copy(req.Input(0).Data, p.Data)
	resp, err := req.Do(ctx)
	if err != nil {
		return err
	}
	defer resp.Release()
	if len(resp.Outputs) != 1 {
		return fmt.Errorf("%d outputs, want 1", len(resp.Outputs))
	}
	o := resp.Outputs[0]
	return p.CheckBytes(o.Shape, o.Data)
}
