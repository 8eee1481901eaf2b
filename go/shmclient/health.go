package shmclient

import (
	"context"
	"fmt"
	"time"
)

// Health is the daemon's readiness (SPEC §2.4 health_report): whether every model can
// serve, and per model its queue and how long its oldest forward pass has been running.
type Health struct {
	// Ready is false while the daemon drains or any model is stuck.
	Ready bool
	// Draining: the daemon is stopping (SIGTERM) and finishing what it has.
	Draining bool
	// Reason says why it is not ready, for people ("" when ready).
	Reason string
	Models []ModelHealth
}

// ModelHealth is one model's part of Health.
type ModelHealth struct {
	Name    string
	Version uint64
	// Ready is false while a forward pass has run longer than the daemon's stuck_after_s.
	Ready  bool
	Queued uint64
	// Running is the age of the model's oldest forward pass running now (0: none).
	Running time.Duration
}

type wireModelHealth struct {
	Name      string `msgpack:"name"`
	Version   uint64 `msgpack:"version"`
	Ready     bool   `msgpack:"ready"`
	Queued    uint64 `msgpack:"queued"`
	RunningMS uint64 `msgpack:"running_ms"`
}

type healthReportMsg struct {
	Type     string            `msgpack:"type"`
	ID       uint64            `msgpack:"id"`
	Ready    bool              `msgpack:"ready"`
	Draining bool              `msgpack:"draining"`
	Reason   string            `msgpack:"reason"`
	Models   []wireModelHealth `msgpack:"models"`
}

type drainingMsg struct {
	Type    string `msgpack:"type"`
	GraceMS uint64 `msgpack:"grace_ms"`
}

// Health asks the daemon whether it can serve. Unlike Ping, which only proves the daemon
// reads its socket, it goes not-ready when a model's compute is stuck or the daemon drains:
// build readiness probes on it. A draining daemon is asked too (it answers Draining);
// while the Client reconnects, Health waits for the next session within ctx, and an error
// (ErrUnavailable once ctx ends) means there is no daemon to serve.
func (c *Client) Health(ctx context.Context) (Health, error) {
	return control(ctx, c, (*session).health)
}

func (s *session) health(ctx context.Context) (Health, error) {
	id := s.nextID.Add(1)
	msg, err := s.call(ctx, id, &idMsg{Type: "health", ID: id})
	if err != nil {
		return Health{}, fmt.Errorf("shmclient: health: %w", err)
	}
	hr, ok := msg.(*healthReportMsg)
	if !ok {
		return Health{}, mayHaveRun(fmt.Errorf("shmclient: health: %w", protocolErrorf("reply is not a health_report")))
	}
	h := Health{Ready: hr.Ready, Draining: hr.Draining, Reason: hr.Reason,
		Models: make([]ModelHealth, len(hr.Models))}
	for i, m := range hr.Models {
		h.Models[i] = ModelHealth{Name: m.Name, Version: m.Version, Ready: m.Ready,
			Queued: m.Queued, Running: time.Duration(m.RunningMS) * time.Millisecond}
	}
	return h, nil
}
