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
// (ErrPermission otherwise). A model loaded so lives as long as the daemon: after a
// reconnect to a restarted daemon, it serves what its config names.
func (c *Client) Load(ctx context.Context, name string, config map[string]any) error {
	return c.admin(ctx, "load", name, func(id uint64) any {
		return &loadMsg{Type: "load", ID: id, Name: name, Config: toMpMap(config)}
	})
}

// Reload swaps a model for a freshly loaded copy of its config, atomically: requests in
// flight finish on the old version, and a failed load keeps the old version serving.
func (c *Client) Reload(ctx context.Context, name string) error {
	return c.admin(ctx, "reload", name, func(id uint64) any { return &nameMsg{Type: "reload", ID: id, Name: name} })
}

// Unload stops serving a model; requests already running finish.
func (c *Client) Unload(ctx context.Context, name string) error {
	return c.admin(ctx, "unload", name, func(id uint64) any { return &nameMsg{Type: "unload", ID: id, Name: name} })
}

// admin sends an admin message to a session that takes work (not to a draining daemon),
// waiting for one while the Client reconnects. It is made again on the next session only
// when it was never sent: an admin message may have been acted on once it was.
func (c *Client) admin(ctx context.Context, op, name string, msg func(id uint64) any) error {
	for {
		s, err := c.session(ctx, true)
		if err != nil {
			return fmt.Errorf("shmclient: %s %q: %w", op, name, err)
		}
		err = s.admin(ctx, op, name, msg)
		if err == nil || !c.opts.reconnect || ctx.Err() != nil || !isGone(err) {
			return err
		}
	}
}

func (s *session) admin(ctx context.Context, op, name string, msg func(id uint64) any) error {
	id := s.nextID.Add(1)
	reply, err := s.call(ctx, id, msg(id))
	if err != nil {
		return fmt.Errorf("shmclient: %s %q: %w", op, name, err)
	}
	if m, ok := reply.(*idMsg); !ok || m.Type != "ok" {
		return mayHaveRun(fmt.Errorf("shmclient: %s %q: %w", op, name, protocolErrorf("reply is not ok")))
	}
	// The model's signature may have changed: validate against fresh metadata next time.
	s.models.forget(name)
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
