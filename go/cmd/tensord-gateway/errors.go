package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/tensord/tensord/go/shmclient"
	"google.golang.org/grpc/codes"
)

// requestError is what the gateway itself finds wrong with a request, with the HTTP status
// and gRPC code to answer it with.
type requestError struct {
	status int
	code   codes.Code
	msg    string
}

func (e *requestError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &requestError{http.StatusBadRequest, codes.InvalidArgument, fmt.Sprintf(format, args...)}
}

func notFound(format string, args ...any) error {
	return &requestError{http.StatusNotFound, codes.NotFound, fmt.Sprintf(format, args...)}
}

func tooLarge(format string, args ...any) error {
	return &requestError{http.StatusRequestEntityTooLarge, codes.ResourceExhausted, fmt.Sprintf(format, args...)}
}

var (
	errNotReady = &requestError{http.StatusServiceUnavailable, codes.Unavailable,
		"tensord-gateway: the tensord daemon is not connected (starting, restarting or stopped); retry shortly"}
	errDraining = &requestError{http.StatusServiceUnavailable, codes.Unavailable,
		"tensord-gateway: shutting down"}
)

// statusClientClosed is nginx's code for a request whose client went away; it is only
// logged, since nobody reads it.
const statusClientClosed = 499

// errorStatus maps an error to an HTTP status and a gRPC code: what the caller can do about
// it (fix the request, retry later, report a bug) decides the class.
func errorStatus(err error) (int, codes.Code) {
	var re *requestError
	switch {
	case errors.As(err, &re):
		return re.status, re.code
	case errors.Is(err, context.DeadlineExceeded): // DEADLINE from the daemon matches too
		return http.StatusGatewayTimeout, codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return statusClientClosed, codes.Canceled
	case errors.Is(err, shmclient.ErrUnknownModel):
		return http.StatusNotFound, codes.NotFound
	case errors.Is(err, shmclient.ErrBadInput), errors.Is(err, shmclient.ErrBadRequest):
		return http.StatusBadRequest, codes.InvalidArgument
	case errors.Is(err, shmclient.ErrTooLarge):
		return http.StatusRequestEntityTooLarge, codes.ResourceExhausted
	case errors.Is(err, shmclient.ErrOverloaded), errors.Is(err, shmclient.ErrShuttingDown),
		errors.Is(err, shmclient.ErrClosed), errors.Is(err, shmclient.ErrResource):
		return http.StatusServiceUnavailable, codes.Unavailable
	case errors.Is(err, shmclient.ErrPermission):
		return http.StatusForbidden, codes.PermissionDenied
	case errors.Is(err, shmclient.ErrUnsupported):
		return http.StatusNotImplemented, codes.Unimplemented
	}
	return http.StatusInternalServerError, codes.Internal // MODEL_FAILED, INTERNAL, protocol errors
}
