package shmclient

import (
	"context"
	"fmt"
	"time"
)

// ModelStats are one model's scheduling counters since its current version was loaded
// (SPEC §2.4 model_stats).
type ModelStats struct {
	Name    string
	Version uint64
	// Queued is how many requests wait in the model's queue now.
	Queued uint64
	// Served requests were answered with outputs; Failed ones with the model's error
	// (ErrModelFailed, an internal error); BadInput ones were refused for their inputs
	// (ErrBadInput and kin: the caller's error, never counted in Failed).
	Served, Failed, BadInput uint64
	// Rejected requests found the queue full (ErrOverloaded); Expired ones ran out of
	// time while queued (ErrDeadline) and were never computed.
	Rejected, Expired uint64
	// Batches is the number of forward passes; BatchSizes maps a batch size (requests
	// joined in one forward pass) to how many passes had it.
	Batches    uint64
	BatchSizes map[int]uint64
	// QueueTime and ComputeTime are totals over all requests and all batches.
	QueueTime, ComputeTime, MaxQueueTime time.Duration
}

// MeanBatchSize is the average number of requests per forward pass (0 before the first).
func (s ModelStats) MeanBatchSize() float64 {
	if s.Batches == 0 {
		return 0
	}
	var n uint64
	for size, count := range s.BatchSizes {
		n += uint64(size) * count
	}
	return float64(n) / float64(s.Batches)
}

type wireModelStat struct {
	Name       string     `msgpack:"name"`
	Version    uint64     `msgpack:"version"`
	Queued     uint64     `msgpack:"queued"`
	Served     uint64     `msgpack:"served"`
	Failed     uint64     `msgpack:"failed"`
	Rejected   uint64     `msgpack:"rejected"`
	Expired    uint64     `msgpack:"expired"`
	Batches    uint64     `msgpack:"batches"`
	BatchSizes [][]uint64 `msgpack:"batch_sizes"`
	QueueUS    uint64     `msgpack:"queue_us"`
	ComputeUS  uint64     `msgpack:"compute_us"`
	MaxQueueUS uint64     `msgpack:"max_queue_us"`
	BadInput   uint64     `msgpack:"bad_input,omitempty"` // written only when not 0
}

type modelStatsMsg struct {
	Type   string          `msgpack:"type"`
	ID     uint64          `msgpack:"id"`
	Models []wireModelStat `msgpack:"models"`
}

// Stats returns every model's scheduling counters, sorted by name: queue length, batch
// sizes, queue and compute time, served, failed, rejected and expired requests. They
// are the current daemon's: they start again from zero after a reconnect.
func (c *Client) Stats(ctx context.Context) ([]ModelStats, error) {
	return control(ctx, c, (*session).stats)
}

func (s *session) stats(ctx context.Context) ([]ModelStats, error) {
	id := s.nextID.Add(1)
	msg, err := s.call(ctx, id, &idMsg{Type: "stats", ID: id})
	if err != nil {
		return nil, fmt.Errorf("shmclient: stats: %w", err)
	}
	ms, ok := msg.(*modelStatsMsg)
	if !ok {
		return nil, mayHaveRun(fmt.Errorf("shmclient: stats: %w", protocolErrorf("reply is not a model_stats")))
	}
	out := make([]ModelStats, len(ms.Models))
	for i, m := range ms.Models {
		sizes := make(map[int]uint64, len(m.BatchSizes))
		for _, pair := range m.BatchSizes {
			if len(pair) != 2 {
				return nil, mayHaveRun(fmt.Errorf("shmclient: stats: %w", protocolErrorf("batch_sizes entry of %d numbers, want 2", len(pair))))
			}
			sizes[int(pair[0])] = pair[1]
		}
		out[i] = ModelStats{Name: m.Name, Version: m.Version, Queued: m.Queued, Served: m.Served,
			Failed: m.Failed, BadInput: m.BadInput, Rejected: m.Rejected, Expired: m.Expired, Batches: m.Batches,
			BatchSizes: sizes, QueueTime: time.Duration(m.QueueUS) * time.Microsecond,
			ComputeTime:  time.Duration(m.ComputeUS) * time.Microsecond,
			MaxQueueTime: time.Duration(m.MaxQueueUS) * time.Microsecond}
	}
	return out, nil
}
