package shmclient

import (
	"context"
	"fmt"
	"sort"
	"sync/atomic"
)

// ModelInfo is a model's metadata (SPEC §2.4 model info). Check tests inputs against its
// signature and Limits before they are sent.
type ModelInfo struct {
	Name    string
	Version uint64
	Device  string
	// Kind says what serves the model: "torchscript", "export", "handler" (a Python
	// handler), "builtin", or a built-in handler: "vision.classify", "text.classify",
	// "text.embed".
	Kind    string
	Inputs  []TensorSpec
	Outputs []TensorSpec
	Limits  ModelLimits
	// Idempotent: running a request twice has the effect of running it once (the model's
	// config says so; the built-in models and handlers are). Infer then makes again a
	// request that may have run when its session ended under it (WithIdempotentRetry).
	// False from a protocol 4 daemon, which does not say.
	Idempotent bool
}

// ModelLimits are what a model refuses beyond (SPEC §2.4); a zero field is no limit.
type ModelLimits struct {
	MaxBatch  uint64   // items per request: the first dimension of each input
	MaxBytes  uint64   // bytes of one item of a Bytes input (an image file, a text)
	MaxPixels uint64   // width × height of one decoded image
	MaxTokens uint64   // tokens of a text the model reads; longer texts are truncated, not refused
	Formats   []string // image formats it decodes, lower case: "png", "jpeg", "webp"
}

// Models lists the daemon's models, sorted by name, and refreshes the metadata the
// client validates inputs against. While the Client reconnects it waits for the next
// session; a session that ends before the reply is asked again on the next one.
func (c *Client) Models(ctx context.Context) ([]ModelInfo, error) {
	return control(ctx, c, (*session).listModels)
}

func (s *session) listModels(ctx context.Context) ([]ModelInfo, error) {
	id := s.nextID.Add(1)
	msg, err := s.call(ctx, id, &idMsg{Type: "models", ID: id})
	if err != nil {
		return nil, fmt.Errorf("shmclient: models: %w", err)
	}
	ml, ok := msg.(*modelListMsg)
	if !ok {
		return nil, mayHaveRun(fmt.Errorf("shmclient: models: %w", protocolErrorf("reply is not a model_list")))
	}
	out := make([]ModelInfo, len(ml.Models))
	cache := make(map[string]*ModelInfo, len(ml.Models))
	for i, m := range ml.Models {
		out[i] = infoFromWire(m)
		// The cache gets its own copy: the caller may modify what it is returned.
		c := infoFromWire(m)
		cache[m.Name] = &c
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	s.models.store(cache)
	return out, nil
}

func infoFromWire(m wireModel) ModelInfo {
	l := m.Limits
	return ModelInfo{Name: m.Name, Version: m.Version, Device: m.Device, Kind: m.Kind,
		Inputs: specsFromWire(m.Inputs), Outputs: specsFromWire(m.Outputs),
		Limits: ModelLimits{MaxBatch: l.MaxBatch, MaxBytes: l.MaxBytes, MaxPixels: l.MaxPixels,
			MaxTokens: l.MaxTokens, Formats: append([]string(nil), l.Formats...)},
		Idempotent: m.Idempotent != nil && *m.Idempotent}
}

// Model returns a model's metadata from the Client's cache, asking the daemon when the
// cache does not have it (a model loaded since, or a new session whose daemon has not been
// asked yet). It fails with ErrUnknownModel when the daemon serves no such model. Use its
// Check to refuse or split a request before sending it, its Limits to size requests, and
// Idempotent to know whether a call may be made again. The result is the caller's copy.
func (c *Client) Model(ctx context.Context, name string) (*ModelInfo, error) {
	if m := c.models.get(name); m != nil {
		cp := m.clone()
		return &cp, nil
	}
	models, err := c.Models(ctx)
	if err != nil {
		return nil, err
	}
	for i := range models {
		if models[i].Name == name {
			return &models[i], nil
		}
	}
	names := make([]string, len(models))
	for i, m := range models {
		names[i] = m.Name
	}
	return nil, notRun(fmt.Errorf("%w: the daemon serves no model named %q (it serves %v)", ErrUnknownModel, name, names))
}

// clone copies m deeply, so a caller's changes cannot reach the cache.
func (m *ModelInfo) clone() ModelInfo {
	cp := *m
	cp.Inputs = cloneSpecs(m.Inputs)
	cp.Outputs = cloneSpecs(m.Outputs)
	cp.Limits.Formats = append([]string(nil), m.Limits.Formats...)
	return cp
}

func cloneSpecs(specs []TensorSpec) []TensorSpec {
	out := make([]TensorSpec, len(specs))
	for i, s := range specs {
		out[i] = s
		if s.Shape != nil {
			out[i].Shape = append([]int64{}, s.Shape...)
		}
	}
	return out
}

// specsFromWire keeps a dtype this client does not know as InvalidDType, which input
// validation treats like "any": the daemon still has the final word.
func specsFromWire(ws []wireSpec) []TensorSpec {
	out := make([]TensorSpec, len(ws))
	for i, w := range ws {
		dt, _ := ParseDType(w.DType)
		out[i] = TensorSpec{Name: w.Name, DType: dt, Shape: w.Shape, Meaning: w.Meaning}
	}
	return out
}

// modelCache is the metadata inputs are checked against before they are written: the
// Client's, shared by its sessions, refreshed by every model_list and emptied when a new
// session starts (its daemon may serve other models).
type modelCache struct {
	p atomic.Pointer[map[string]*ModelInfo]
}

func (mc *modelCache) store(m map[string]*ModelInfo) {
	if m == nil {
		mc.p.Store(nil)
		return
	}
	mc.p.Store(&m)
}

func (mc *modelCache) get(name string) *ModelInfo {
	if m := mc.p.Load(); m != nil {
		return (*m)[name]
	}
	return nil
}

// forget drops cached metadata the daemon contradicted (unloaded or reloaded).
func (mc *modelCache) forget(name string) {
	for {
		old := mc.p.Load()
		if old == nil || (*old)[name] == nil {
			return
		}
		m := make(map[string]*ModelInfo, len(*old))
		for k, v := range *old {
			if k != name {
				m[k] = v
			}
		}
		if mc.p.CompareAndSwap(old, &m) {
			return
		}
	}
}
