package shmclient

import "context"

// Priority orders requests in a model's queue (SPEC §4.4): high-priority requests are
// served first; within a priority the daemon takes one request per session in turn.
type Priority uint8

const (
	// PriorityNormal is the default.
	PriorityNormal Priority = 0
	// PriorityHigh requests go ahead of every normal one queued for the same model.
	PriorityHigh Priority = 1
)

type priorityKey struct{}

// WithPriority returns a context whose calls (Infer, Request.Send/Do) carry priority p.
// Like a deadline, it travels with the call rather than the Client:
//
//	ctx = shmclient.WithPriority(ctx, shmclient.PriorityHigh)
//	out, err := c.Infer(ctx, "resnet", img)
func WithPriority(ctx context.Context, p Priority) context.Context {
	return context.WithValue(ctx, priorityKey{}, p)
}

func priorityFrom(ctx context.Context) Priority {
	p, _ := ctx.Value(priorityKey{}).(Priority)
	return p
}
