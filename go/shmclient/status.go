package shmclient

import (
	"context"
	"errors"
)

// What a service in front of tensord answers its own callers. The class is decided by
// what the caller can do about the error: fix the request (4xx / INVALID_ARGUMENT...), try
// again later (503 / UNAVAILABLE), or report a bug (500 / INTERNAL). tensord-gateway
// answers with exactly this mapping.
//
//	error                                           HTTP  gRPC code
//	ErrBadInput, ErrBadRequest                       400  INVALID_ARGUMENT (3)
//	ErrUnknownModel                                  404  NOT_FOUND (5)
//	ErrTooLarge                                      413  RESOURCE_EXHAUSTED (8)
//	ErrPermission                                    403  PERMISSION_DENIED (7)
//	ErrDeadline, context.DeadlineExceeded            504  DEADLINE_EXCEEDED (4)
//	context.Canceled (the caller went away)          499  CANCELLED (1)
//	ErrOverloaded                                    429  RESOURCE_EXHAUSTED (8)
//	ErrUnavailable (even when the caller's deadline
//	  ended waiting for a daemon), ErrShuttingDown,
//	  ErrClosed, ErrResource (retry later: Retryable) 503  UNAVAILABLE (14)
//	ErrUnsupported                                   501  UNIMPLEMENTED (12)
//	ErrModelFailed, ErrInternal, ErrProtocol, other  500  INTERNAL (13)
//
// A 503 or 429 is worth a Retry-After; a 500 after ErrMayHaveRun means the model may have
// run (SafeToRetry).

// StatusClientClosedRequest is nginx's 499: the caller went away before the answer.
const StatusClientClosedRequest = 499

// HTTP statuses are written as numbers (net/http's names in the table above) so that a
// client of this package does not link net/http for them.

// gRPC status codes (google.golang.org/grpc/codes), numbered as gRPC numbers them, so this
// package needs no gRPC dependency: codes.Code(GRPCCode(err)) converts.
const (
	grpcCanceled          = 1
	grpcInvalidArgument   = 3
	grpcDeadlineExceeded  = 4
	grpcNotFound          = 5
	grpcPermissionDenied  = 7
	grpcResourceExhausted = 8
	grpcUnimplemented     = 12
	grpcInternal          = 13
	grpcUnavailable       = 14
)

// HTTPStatus returns the HTTP status a service answers its caller with for err (see the
// table above); 200 for nil.
func HTTPStatus(err error) int {
	s, _ := statusOf(err)
	return s
}

// GRPCCode returns the gRPC status code, as a number, a service answers its caller with
// for err (see the table above); 0 (OK) for nil. Convert with codes.Code(GRPCCode(err)).
func GRPCCode(err error) uint32 {
	_, c := statusOf(err)
	return c
}

func statusOf(err error) (int, uint32) {
	switch {
	case err == nil:
		return 200, 0
	case errors.Is(err, ErrUnavailable): // no daemon, even if the caller's deadline ended first
		return 503, grpcUnavailable
	case errors.Is(err, context.DeadlineExceeded): // DEADLINE from the daemon matches too
		return 504, grpcDeadlineExceeded
	case errors.Is(err, context.Canceled):
		return StatusClientClosedRequest, grpcCanceled
	case errors.Is(err, ErrUnknownModel):
		return 404, grpcNotFound
	case errors.Is(err, ErrBadInput), errors.Is(err, ErrBadRequest):
		return 400, grpcInvalidArgument
	case errors.Is(err, ErrTooLarge):
		return 413, grpcResourceExhausted
	case errors.Is(err, ErrOverloaded):
		return 429, grpcResourceExhausted
	case errors.Is(err, ErrShuttingDown), errors.Is(err, ErrUnavailable),
		errors.Is(err, ErrClosed), errors.Is(err, ErrResource):
		return 503, grpcUnavailable
	case errors.Is(err, ErrPermission):
		return 403, grpcPermissionDenied
	case errors.Is(err, ErrUnsupported):
		return 501, grpcUnimplemented
	}
	return 500, grpcInternal
}
