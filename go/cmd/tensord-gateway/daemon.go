package main

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

// backend is what the HTTP and gRPC front ends need from the daemon; tests give them a
// fake one.
type backend interface {
	// Ready reports whether the daemon is connected.
	Ready() bool
	// Models lists the daemon's models (a fresh answer from the daemon).
	Models(ctx context.Context) ([]shmclient.ModelInfo, error)
	// Model returns a model's metadata, at most a second old, or ErrUnknownModel.
	Model(ctx context.Context, name string) (*shmclient.ModelInfo, error)
	// Infer runs a model. The outputs are valid until release is called (they may be views
	// of shared memory); release must be called exactly once.
	Infer(ctx context.Context, model string, inputs []shmclient.Tensor) (outputs []shmclient.Tensor, release func(), err error)
}

// daemon is the gateway's one connection to tensord: it dials, notices when the daemon goes
// away (the session's Done channel), and dials again, so readiness follows the daemon.
type daemon struct {
	socket string
	opts   []shmclient.Option
	log    *slog.Logger

	cur atomic.Pointer[shmclient.Client] // nil while disconnected

	mu       sync.Mutex // guards the metadata cache
	cache    map[string]*shmclient.ModelInfo
	cachedAt time.Time
	cacheOf  *shmclient.Client
}

const metadataMaxAge = time.Second

func newDaemon(socket string, log *slog.Logger, opts ...shmclient.Option) *daemon {
	return &daemon{socket: socket, opts: opts, log: log}
}

// run keeps a session open until ctx ends, then closes it.
func (d *daemon) run(ctx context.Context) {
	backoff := 50 * time.Millisecond
	failing := false
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		// The gateway redials itself (below), so its readiness can follow each session: the
		// client's own reconnect would hide a daemon restart from /v2/health/ready.
		opts := append([]shmclient.Option{shmclient.WithReconnect(false)}, d.opts...)
		c, err := shmclient.Dial(dctx, d.socket, opts...)
		cancel()
		if err != nil {
			if !failing && ctx.Err() == nil {
				d.log.Warn("cannot connect to the tensord daemon; retrying", "socket", d.socket, "err", err)
				failing = true
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		failing, backoff = false, 50*time.Millisecond
		d.cur.Store(c)
		d.log.Info("connected to the tensord daemon", "socket", d.socket, "daemon", c.Daemon(), "session", c.Session())
		select {
		case <-c.Done():
			d.log.Warn("the tensord daemon connection ended; reconnecting", "err", c.Err())
		case <-ctx.Done():
		}
		d.cur.CompareAndSwap(c, nil)
		c.Close()
	}
}

func (d *daemon) client() (*shmclient.Client, error) {
	c := d.cur.Load()
	if c == nil || c.Err() != nil {
		return nil, errNotReady
	}
	return c, nil
}

func (d *daemon) Ready() bool {
	_, err := d.client()
	return err == nil
}

func (d *daemon) Models(ctx context.Context) ([]shmclient.ModelInfo, error) {
	c, err := d.client()
	if err != nil {
		return nil, err
	}
	models, err := c.Models(ctx)
	if err != nil {
		return nil, err
	}
	cache := make(map[string]*shmclient.ModelInfo, len(models))
	for i := range models {
		m := models[i]
		cache[m.Name] = &m
	}
	d.mu.Lock()
	d.cache, d.cachedAt, d.cacheOf = cache, time.Now(), c
	d.mu.Unlock()
	return models, nil
}

func (d *daemon) Model(ctx context.Context, name string) (*shmclient.ModelInfo, error) {
	c, err := d.client()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	m, fresh := d.cache[name], d.cacheOf == c && time.Since(d.cachedAt) < metadataMaxAge
	d.mu.Unlock()
	if m == nil || !fresh { // a model loaded since, or a new session: ask the daemon
		if _, err := d.Models(ctx); err != nil {
			return nil, err
		}
		d.mu.Lock()
		m = d.cache[name]
		d.mu.Unlock()
	}
	if m == nil {
		return nil, notFound("tensord serves no model named %q", name)
	}
	return m, nil
}

func (d *daemon) Infer(ctx context.Context, model string, inputs []shmclient.Tensor) ([]shmclient.Tensor, func(), error) {
	c, err := d.client()
	if err != nil {
		return nil, nil, err
	}
	var buf [8]shmclient.TensorSpec
	specs := buf[:0]
	for _, t := range inputs {
		specs = append(specs, shmclient.TensorSpec{Name: t.Name, DType: t.DType, Shape: t.Shape, NBytes: int64(len(t.Data))})
	}
	// The request is reserved only now that every input is in memory: a reservation
	// holds back every later request of the session until it is published.
	req, err := c.NewRequest(ctx, model, specs...)
	if err != nil {
		return nil, nil, err
	}
	for i, t := range inputs {
		copy(req.Input(i).Data, t.Data)
	}
	resp, err := req.Do(ctx)
	if err != nil {
		return nil, nil, err
	}
	return resp.Outputs, resp.Release, nil
}
