package main

import (
	"context"
	"errors"
	"log/slog"
	"sync"
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
	// Stats returns every model's scheduling counters.
	Stats(ctx context.Context) ([]shmclient.ModelStats, error)
	// Infer runs a model. The outputs are valid until release is called (they may be views
	// of shared memory); release must be called exactly once.
	Infer(ctx context.Context, model string, inputs []shmclient.Tensor) (outputs []shmclient.Tensor, release func(), err error)
}

// daemon is the gateway's one connection to tensord: a shmclient.Client that connects in
// the background (the gateway may start before the daemon) and reconnects when the daemon
// restarts. Readiness follows its session; a request made while it reconnects is held
// until the new session is there, for at most -hold and the request's own deadline, then
// answered 503 / UNAVAILABLE (a restart of the daemon is no outage for a caller whose
// deadline outlasts it).
type daemon struct {
	socket string
	opts   []shmclient.Option
	log    *slog.Logger
	hold   time.Duration // longest wait for a session; 0: none

	c *shmclient.Client

	mu       sync.Mutex // guards the metadata cache
	cache    map[string]*shmclient.ModelInfo
	cachedAt time.Time
	cacheOf  string // the session the cache came from
}

const metadataMaxAge = time.Second

func newDaemon(socket string, log *slog.Logger, hold time.Duration, opts ...shmclient.Option) *daemon {
	return &daemon{socket: socket, opts: opts, log: log, hold: hold}
}

// dial makes the Client; it connects in the background and logs each session.
func (d *daemon) dial(ctx context.Context) error {
	opts := append([]shmclient.Option{
		shmclient.WithRetryOnFailedConnect(true),
		shmclient.WithMaxReconnectWait(time.Second),
		shmclient.WithDisconnectHandler(func(err error) {
			d.log.Warn("the tensord daemon connection ended; reconnecting", "err", err)
		}),
		shmclient.WithReconnectHandler(func() {
			d.log.Info("connected to the tensord daemon", "socket", d.socket, "daemon", d.c.Daemon(), "session", d.c.Session())
		}),
	}, d.opts...)
	c, err := shmclient.Dial(ctx, d.socket, opts...)
	if err != nil {
		return err
	}
	d.c = c
	if c.Connected() {
		d.log.Info("connected to the tensord daemon", "socket", d.socket, "daemon", c.Daemon(), "session", c.Session())
	} else {
		d.log.Warn("cannot connect to the tensord daemon; retrying", "socket", d.socket)
	}
	return nil
}

func (d *daemon) close() {
	if d.c != nil {
		d.c.Close()
	}
}

// held bounds the wait for a session by -hold (the call's own deadline bounds it too).
func (d *daemon) held(ctx context.Context) (context.Context, context.CancelFunc, error) {
	if d.c.Connected() {
		return ctx, func() {}, nil
	}
	if d.hold <= 0 {
		return nil, nil, errNotReady
	}
	hctx, cancel := context.WithTimeout(ctx, d.hold)
	return hctx, cancel, nil
}

// notReady turns the end of a wait for a session into 503, keeping other errors.
func notReady(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil && shmclient.Retryable(err) {
		return errNotReady
	}
	return err
}

func (d *daemon) Ready() bool { return d.c != nil && d.c.Connected() }

func (d *daemon) Models(ctx context.Context) ([]shmclient.ModelInfo, error) {
	hctx, cancel, err := d.held(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	models, err := d.c.Models(hctx)
	if err != nil {
		return nil, notReady(hctx, err)
	}
	cache := make(map[string]*shmclient.ModelInfo, len(models))
	for i := range models {
		m := models[i]
		cache[m.Name] = &m
	}
	d.mu.Lock()
	d.cache, d.cachedAt, d.cacheOf = cache, time.Now(), d.c.Session()
	d.mu.Unlock()
	return models, nil
}

func (d *daemon) Model(ctx context.Context, name string) (*shmclient.ModelInfo, error) {
	d.mu.Lock()
	m, fresh := d.cache[name], d.cacheOf == d.c.Session() && d.c.Connected() && time.Since(d.cachedAt) < metadataMaxAge
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

func (d *daemon) Stats(ctx context.Context) ([]shmclient.ModelStats, error) {
	hctx, cancel, err := d.held(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	st, err := d.c.Stats(hctx)
	return st, notReady(hctx, err)
}

func (d *daemon) Infer(ctx context.Context, model string, inputs []shmclient.Tensor) ([]shmclient.Tensor, func(), error) {
	var buf [8]shmclient.TensorSpec
	specs := buf[:0]
	for _, t := range inputs {
		specs = append(specs, shmclient.TensorSpec{Name: t.Name, DType: t.DType, Shape: t.Shape, NBytes: int64(len(t.Data))})
	}
	hctx, cancel, err := d.held(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer cancel()
	replayed := false
	for {
		// The request is reserved only now that every input is in memory: a reservation
		// holds back every later request of the session until it is published. Reserving
		// waits for a session (within -hold); running it has the request's whole deadline.
		req, err := d.c.NewRequest(hctx, model, specs...)
		if err != nil {
			return nil, nil, notReady(hctx, err)
		}
		for i, t := range inputs {
			copy(req.Input(i).Data, t.Data)
		}
		resp, err := req.Do(ctx)
		if err == nil {
			return resp.Outputs, resp.Release, nil
		}
		if hctx.Err() != nil {
			return nil, nil, err
		}
		// The inputs are still here: a request the daemon's restart kept from running goes
		// to the next daemon; one to an idempotent model that may have run, once.
		gone := errors.Is(err, shmclient.ErrClosed) || errors.Is(err, shmclient.ErrShuttingDown)
		switch {
		case gone && shmclient.SafeToRetry(err) && !errors.Is(err, shmclient.ErrOverloaded):
		case gone && !replayed && errors.Is(err, shmclient.ErrMayHaveRun) && d.idempotent(model):
			replayed = true
		default:
			return nil, nil, err
		}
	}
}

// idempotent reports what the daemon said of the model (SPEC §6 "Idempotent models").
func (d *daemon) idempotent(model string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.cache[model]
	return m != nil && m.Idempotent
}
