// Package shmclient is the Go client of tensord, a daemon that serves PyTorch models to
// processes on the same host.
//
// Control messages (handshake, model metadata, errors) are msgpack frames on a Unix
// socket; tensors never touch the socket. They travel through two rings in a
// shared-memory segment per session: the client writes request records into one and
// reads response records from the other, and the two processes wake each other with
// named POSIX semaphores. protocol/SPEC.md in the tensord repository is the contract
// this package implements.
//
// # Usage
//
//	c, err := shmclient.Dial(ctx, "") // $TENSORD_SOCKET or the default socket
//	if err != nil { ... }
//	defer c.Close()
//	out, err := c.Infer(ctx, "mlp", shmclient.FromFloat32("x", []int64{1, 16}, x))
//
// Infer copies inputs into the ring and outputs out of it. For large tensors the
// zero-copy path avoids both copies: NewRequest reserves a record and returns inputs
// whose Data is shared memory to fill in place, Request.Do publishes it, and the
// Response's outputs are views into the response ring until Response.Release.
//
// # Concurrency
//
// A Client is safe for concurrent use, and one Client per process is the intended use:
// requests from many goroutines share the rings, responses are matched to callers by
// request id, and records are released in any order. A Request belongs to one goroutine.
//
// # Errors and cancellation
//
// Errors wrap the sentinel errors of this package (ErrUnknownModel, ErrBadInput, ...)
// for errors.Is; errors reported by the daemon are *DaemonError values. When a context
// ends, calls return promptly with an error wrapping ctx.Err(); a request already
// published is answered by the daemon later and its response is released by the
// client. The context's deadline is also sent to the daemon as the request's time
// budget. When the daemon exits or dies, every pending and later call fails with an
// error wrapping ErrClosed; Dial again to continue.
//
// # Memory
//
// Views (Request inputs, Response outputs) stay valid after Close or the daemon's
// death: the segment is unmapped only when the last view is released. Unreleased
// responses hold response-ring space, and the daemon stalls when the ring is full, so
// release every Response. Size the rings with WithRingSize for the largest request and
// response.
//
// The package needs cgo (for sem_open and friends) and a little-endian host.
package shmclient
