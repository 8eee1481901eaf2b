package main

import (
	"context"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

// gateway holds what both front ends share: the backend, limits and shutdown state.
type gateway struct {
	b           backend
	log         *slog.Logger
	maxTimeout  time.Duration // the longest a request may run; 0: no limit
	maxBody     int64         // largest request body / message (decompressed)
	inflight    *budget       // request body bytes held at once (body.go); nil: no bound
	bodyTimeout time.Duration // the longest a request body may take to arrive; 0: none
	draining    atomic.Bool   // shutting down: not ready, no new requests
}

// inferRequest is one inference request of either front end, its inputs already in
// tensord's layout.
type inferRequest struct {
	model, version, id string
	inputs             []shmclient.Tensor
	outputs            []requestedOutput // empty: every output, in the model's order
	timeout            time.Duration     // the request's "timeout" parameter; 0: none
}

type requestedOutput struct {
	name   string
	binary int8 // HTTP: -1 JSON, 1 binary, 0 as the request says
}

// inferResult holds the outputs the caller asked for; they stay valid until release.
type inferResult struct {
	version string
	outputs []shmclient.Tensor
	binary  []int8 // per output, from requestedOutput
	release func()
}

func (g *gateway) ready() bool { return !g.draining.Load() && g.b.Ready() }

// model resolves a name and an optional version: tensord serves one version of a model at a
// time, so any other version is not found.
func (g *gateway) model(ctx context.Context, name, version string) (*shmclient.ModelInfo, error) {
	if g.draining.Load() {
		return nil, errDraining
	}
	m, err := g.b.Model(ctx, name)
	if err != nil {
		return nil, err
	}
	if version != "" && version != strconv.FormatUint(m.Version, 10) {
		return nil, notFound("model %q version %s is not served; tensord serves one version at a time, now %d", name, version, m.Version)
	}
	return m, nil
}

// timeoutParam reads the protocol's "timeout" request parameter, in microseconds.
func timeoutParam(us int64) (time.Duration, error) {
	if us < 0 {
		return 0, badRequest("parameter timeout %d must not be negative (microseconds)", us)
	}
	return time.Duration(us) * time.Microsecond, nil
}

func (g *gateway) infer(ctx context.Context, req *inferRequest) (*inferResult, error) {
	m, err := g.model(ctx, req.model, req.version)
	if err != nil {
		return nil, err
	}
	limit := g.maxTimeout
	if req.timeout > 0 && (limit == 0 || req.timeout < limit) {
		limit = req.timeout
	}
	if limit > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, limit)
		defer cancel()
	}
	outs, release, err := g.b.Infer(ctx, req.model, req.inputs)
	if err != nil {
		return nil, err
	}
	res := &inferResult{version: strconv.FormatUint(m.Version, 10), release: release}
	if len(req.outputs) == 0 {
		res.outputs = outs
		res.binary = make([]int8, len(outs))
		return res, nil
	}
	for _, want := range req.outputs {
		i := indexOf(outs, want.name)
		if i < 0 {
			release()
			names := make([]string, len(outs))
			for j, o := range outs {
				names[j] = o.Name
			}
			return nil, badRequest("model %q has no output %q; its outputs are %v", req.model, want.name, names)
		}
		res.outputs = append(res.outputs, outs[i])
		res.binary = append(res.binary, want.binary)
	}
	return res, nil
}

func indexOf(ts []shmclient.Tensor, name string) int {
	for i, t := range ts {
		if t.Name == name {
			return i
		}
	}
	return -1
}

// platform names what serves a model in the protocol's metadata.
func platform(m *shmclient.ModelInfo) string {
	if m.Kind == "" {
		return "tensord"
	}
	return "tensord/" + m.Kind
}

// checkNumeric checks that a numeric input's data is the size its shape and datatype say.
func checkNumeric(name string, d shmclient.DType, n int64, data []byte) error {
	if want := n * int64(d.Size()); int64(len(data)) != want {
		return badRequest("input %q: %d bytes of data, shape and datatype %s need %d", name, len(data), datatypeName(d), want)
	}
	return nil
}
