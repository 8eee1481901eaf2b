package shmclient

import (
	"context"
	"fmt"
	"sort"
)

// Load asks the daemon to load a model. config holds the keys of a [[models]] table of the
// daemon's TOML config ("source", "path", "device", "precision", "inputs", ...). The call
// returns once the model has loaded and warmed up; a failed load leaves the daemon as it
// was and returns an error wrapping ErrModelFailed (or ErrBadRequest for a bad config).
// Only peers whose uid is in the daemon's admin_uids may load, unload or reload
// (ErrPermission otherwise).
func (c *Client) Load(ctx context.Context, name string, config map[string]any) error {
	id := c.nextID.Add(1)
	return c.admin(ctx, "load", name, &loadMsg{Type: "load", ID: id, Name: name, Config: toMpMap(config)}, id)
}

// Reload swaps a model for a freshly loaded copy of its config, atomically: requests in
// flight finish on the old version, and a failed load keeps the old version serving.
func (c *Client) Reload(ctx context.Context, name string) error {
	id := c.nextID.Add(1)
	return c.admin(ctx, "reload", name, &nameMsg{Type: "reload", ID: id, Name: name}, id)
}

// Unload stops serving a model; requests already running finish.
func (c *Client) Unload(ctx context.Context, name string) error {
	id := c.nextID.Add(1)
	return c.admin(ctx, "unload", name, &nameMsg{Type: "unload", ID: id, Name: name}, id)
}

func (c *Client) admin(ctx context.Context, op, name string, msg any, id uint64) error {
	reply, err := c.call(ctx, id, msg)
	if err != nil {
		return fmt.Errorf("shmclient: %s %q: %w", op, name, err)
	}
	if m, ok := reply.(*idMsg); !ok || m.Type != "ok" {
		return fmt.Errorf("shmclient: %s %q: %w", op, name, protocolErrorf("reply is not ok"))
	}
	// The model's signature may have changed: validate against fresh metadata next time.
	c.forgetModel(name)
	return nil
}

// toMpMap orders a Go map's keys so the frame is the same bytes every time.
func toMpMap(m map[string]any) mpMap {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make(mpMap, len(keys))
	for i, k := range keys {
		v := m[k]
		if sub, ok := v.(map[string]any); ok {
			v = toMpMap(sub)
		}
		out[i] = mpKV{Key: k, Value: v}
	}
	return out
}
