package shmclient

import (
	"context"
	"fmt"
	"sort"
)

// ModelInfo is a model's metadata (SPEC §2.4 model info).
type ModelInfo struct {
	Name    string
	Version uint64
	Device  string
	Inputs  []TensorSpec
	Outputs []TensorSpec
}

// Models lists the daemon's models, sorted by name, and refreshes the metadata the
// client validates inputs against.
func (c *Client) Models(ctx context.Context) ([]ModelInfo, error) {
	id := c.nextID.Add(1)
	msg, err := c.call(ctx, id, &idMsg{Type: "models", ID: id})
	if err != nil {
		return nil, fmt.Errorf("shmclient: models: %w", err)
	}
	ml, ok := msg.(*modelListMsg)
	if !ok {
		return nil, fmt.Errorf("shmclient: models: %w", protocolErrorf("reply is not a model_list"))
	}
	out := make([]ModelInfo, len(ml.Models))
	cache := make(map[string]*ModelInfo, len(ml.Models))
	for i, m := range ml.Models {
		out[i] = ModelInfo{Name: m.Name, Version: m.Version, Device: m.Device,
			Inputs: specsFromWire(m.Inputs), Outputs: specsFromWire(m.Outputs)}
		// The cache gets its own copy: the caller may modify what it is returned.
		cache[m.Name] = &ModelInfo{Name: m.Name, Version: m.Version, Device: m.Device,
			Inputs: specsFromWire(m.Inputs), Outputs: specsFromWire(m.Outputs)}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	c.models.Store(&cache)
	return out, nil
}

// specsFromWire keeps a dtype this client does not know as InvalidDType, which input
// validation treats like "any": the daemon still has the final word.
func specsFromWire(ws []wireSpec) []TensorSpec {
	out := make([]TensorSpec, len(ws))
	for i, w := range ws {
		dt, _ := ParseDType(w.DType)
		out[i] = TensorSpec{Name: w.Name, DType: dt, Shape: w.Shape}
	}
	return out
}

func (c *Client) modelInfo(name string) *ModelInfo {
	if m := c.models.Load(); m != nil {
		return (*m)[name]
	}
	return nil
}

// forgetModel drops cached metadata the daemon contradicted (unloaded or reloaded).
func (c *Client) forgetModel(name string) {
	for {
		old := c.models.Load()
		if old == nil || (*old)[name] == nil {
			return
		}
		m := make(map[string]*ModelInfo, len(*old))
		for k, v := range *old {
			if k != name {
				m[k] = v
			}
		}
		if c.models.CompareAndSwap(old, &m) {
			return
		}
	}
}
