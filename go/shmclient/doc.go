// Package shmclient is the Go client of tensord, a daemon that serves PyTorch models to
// processes on the same host.
//
// Control messages (handshake, model metadata, errors) are msgpack frames on a Unix
// socket; tensors never touch the socket. They travel through two rings in a
// shared-memory segment per session: the client writes request records into one and
// reads response records from the other, and the two processes wake each other with four
// eventfds. The daemon passes the segment (a sealed memfd) and the eventfds to the client
// as descriptors at the handshake, so nothing of a session has a name in /dev/shm, needs
// an owner, or outlives the two processes. protocol/SPEC.md (protocol version 5; daemons of version 4 are spoken to as well) in the
// tensord repository is the contract this package implements.
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
// Response's outputs are views into the response ring until Response.Release:
//
//	req, err := c.NewRequest(ctx, "mlp", shmclient.TensorSpec{Name: "x", DType: shmclient.F32, Shape: []int64{1, 16}})
//	if err != nil { ... }
//	copy(req.Input(0).Float32s(), x)
//	resp, err := req.Do(ctx)
//	if err != nil { ... }
//	defer resp.Release()
//	y := resp.Outputs[0].Float32s()
//
// Request and Response are small handle values. The client reuses the memory behind a
// request once it has ended, so the zero-copy path allocates nothing; a handle kept past
// that point is recognised as stale and does nothing.
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
// budget.
//
// Every error of a call also says whether the request certainly did not run in the
// daemon, so that making it again cannot run it twice (SafeToRetry), or may have run
// (errors.Is(err, ErrMayHaveRun)), and whether making it again unchanged can succeed
// (Retryable): see the list in errors.go. Both follow from the error's code, wherever it
// was found. A *DaemonError says which input, item and limit it is about; HTTPStatus and
// GRPCCode give the status a service answers its own callers with.
//
// # Restarts
//
// A Client outlives its daemon. When the daemon exits, dies or restarts, or says it is
// draining (a SIGTERM: it finishes what it has, then stops), the Client dials again with
// jittered, capped backoff, and calls made meanwhile wait for the new session within
// their own context; the model metadata is fetched again from the new daemon. Requests
// that were in flight when a daemon died fail with ErrClosed and ErrMayHaveRun; those in
// flight when it started draining finish. WithRetry(true) also makes Infer again when
// the daemon refused it without running it and may take it later (it was stopping, or
// the model's queue was full). WithReconnect(false) restores a Client that ends with its
// session; WithReconnectWait, WithMaxReconnectWait, WithMaxReconnects,
// WithDisconnectHandler and WithReconnectHandler tune and observe reconnecting.
// WithRetryOnFailedConnect lets Dial succeed before the daemon is up (Connected tells),
// WithFailFast makes calls fail at once while no daemon answers, and a request to an
// idempotent model in flight when the daemon died is made again on the next session
// (WithIdempotentRetry). `tensord upgrade` replaces a daemon with one that has loaded its
// models before it takes the socket over: a Client sees the old one draining and moves to
// the new one with no failed call.
//
// # Memory
//
// Views (Request inputs, Response outputs) stay valid after Close or the daemon's
// death: the segment is unmapped only when the last view is released. Unreleased
// responses hold response-ring space, and the daemon stalls when the ring is full, so
// release every Response. Size the rings with WithRingSize for the largest request and
// response.
//
// # Platform
//
// Linux on a little-endian 64-bit CPU (amd64, arm64). The package is pure Go: it needs no
// cgo and builds with CGO_ENABLED=0. A goroutine waiting for the daemon sleeps in a
// ppoll(2) system call, holding an OS thread; a session has at most one such waiter per
// direction (one reading responses, one waiting for request-ring space), however many
// goroutines share the Client.
package shmclient
