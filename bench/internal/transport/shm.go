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
	high     bool // requests at shmclient.PriorityHigh
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
	return &shmTransport{c: c, zeroCopy: cfg.Kind == ShmZeroCopy, high: cfg.Priority > 0}, nil
}

func (t *shmTransport) NewCaller() (Caller, error) {
	return &shmCaller{t: t}, nil
}

func (t *shmTransport) Close() error { return t.c.Close() }

type shmCaller struct{ t *shmTransport }

func (c *shmCaller) Close() error { return nil }

func dtypeOf(p *Payload) shmclient.DType {
	if p.Bytes {
		return shmclient.Bytes
	}
	return shmclient.F32
}

func (c *shmCaller) Call(ctx context.Context, p *Payload) error {
	if c.t.high {
		ctx = shmclient.WithPriority(ctx, shmclient.PriorityHigh)
	}
	if c.t.zeroCopy {
		return c.callZeroCopy(ctx, p)
	}
	out, err := c.t.c.Infer(ctx, p.Model, shmclient.Tensor{Name: p.Input, DType: dtypeOf(p), Shape: p.Shape, Data: p.Data})
	if err != nil {
		return err
	}
	return checkOutputs(p, out)
}

// checkOutputs checks a response's outputs: their number, and each one's shape (images) or
// the one output's shape, size and probes (identity, mlp).
func checkOutputs(p *Payload, outs []shmclient.Tensor) error {
	if len(outs) != p.NOut {
		return fmt.Errorf("%d outputs, want %d", len(outs), p.NOut)
	}
	if p.Kind == KindImage {
		for _, o := range outs {
			if err := p.CheckShape(o.Shape); err != nil {
				return fmt.Errorf("output %s: %w", o.Name, err)
			}
		}
		return nil
	}
	return p.CheckBytes(outs[0].Shape, outs[0].Data)
}

// callZeroCopy reserves the request record, writes the input straight into shared memory
// (the one copy any producer pays: it has to put its numbers somewhere), and checks the
// output where it lies in the response ring, releasing it afterwards.
func (c *shmCaller) callZeroCopy(ctx context.Context, p *Payload) error {
	spec := shmclient.TensorSpec{Name: p.Input, DType: dtypeOf(p), Shape: p.Shape}
	if p.Bytes {
		spec.NBytes = int64(len(p.Data))
	}
	req, err := c.t.c.NewRequest(ctx, p.Model, spec)
	if err != nil {
		return err
	}
	copy(req.Input(0).Data, p.Data)
	resp, err := req.Do(ctx)
	if err != nil {
		return err
	}
	defer resp.Release()
	return checkOutputs(p, resp.Outputs)
}
