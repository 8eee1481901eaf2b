package harness

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

// StatsDelta is a model's scheduling counters (shmclient.Stats) over one point's timed
// phase: how the daemon batched the requests and where they waited.
type StatsDelta struct {
	Model    string `json:"model"`
	Served   uint64 `json:"served"`
	Failed   uint64 `json:"failed"`
	Rejected uint64 `json:"rejected"`
	Expired  uint64 `json:"expired"`
	Batches  uint64 `json:"batches"`
	// MeanBatch is requests per forward pass; BatchSizes maps a batch size to passes.
	MeanBatch  float64           `json:"mean_batch"`
	BatchSizes map[string]uint64 `json:"batch_sizes"`
	// QueueUS is the mean time a request waited in the model's queue, ComputeUS the mean
	// time of one forward pass (gather, run, split), both in microseconds.
	QueueUS   float64 `json:"queue_us"`
	ComputeUS float64 `json:"compute_us"`
}

// probe samples a daemon's model stats around a timed phase, on a session of its own.
type probe struct {
	c     *shmclient.Client
	model string
	first *shmclient.ModelStats
}

// openProbe connects to p.Stats; with none (or on failure, which it reports on stderr) the
// probe does nothing.
func openProbe(ctx context.Context, p Point) *probe {
	pr := &probe{model: p.Model}
	if p.Stats == "" {
		return pr
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := shmclient.Dial(dctx, p.Stats, shmclient.WithRingSize(1<<16, 1<<16), shmclient.WithName("tensord-bench-stats"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: stats of %s: %v\n", p.Stats, err)
		return pr
	}
	pr.c = c
	return pr
}

func (pr *probe) get(ctx context.Context) *shmclient.ModelStats {
	if pr.c == nil {
		return nil
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	all, err := pr.c.Stats(sctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: stats: %v\n", err)
		return nil
	}
	for i := range all {
		if all[i].Name == pr.model {
			return &all[i]
		}
	}
	return nil
}

func (pr *probe) before(ctx context.Context) { pr.first = pr.get(ctx) }

func (pr *probe) after(ctx context.Context) *StatsDelta {
	b := pr.get(ctx)
	a := pr.first
	if a == nil || b == nil || a.Version != b.Version {
		return nil
	}
	d := &StatsDelta{Model: pr.model, Served: b.Served - a.Served, Failed: b.Failed - a.Failed,
		Rejected: b.Rejected - a.Rejected, Expired: b.Expired - a.Expired, Batches: b.Batches - a.Batches,
		BatchSizes: map[string]uint64{}}
	var reqs uint64
	for size, n := range b.BatchSizes {
		if k := n - a.BatchSizes[size]; k > 0 {
			d.BatchSizes[fmt.Sprint(size)] = k
			reqs += uint64(size) * k
		}
	}
	if d.Batches > 0 {
		d.MeanBatch = float64(reqs) / float64(d.Batches)
		d.ComputeUS = float64(b.ComputeTime-a.ComputeTime) / 1e3 / float64(d.Batches)
	}
	if n := d.Served + d.Failed + d.Expired; n > 0 {
		d.QueueUS = float64(b.QueueTime-a.QueueTime) / 1e3 / float64(n)
	}
	return d
}

func (pr *probe) close() {
	if pr.c != nil {
		_ = pr.c.Close()
	}
}
