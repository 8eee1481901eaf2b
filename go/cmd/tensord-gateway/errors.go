package main

import (
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

// errorStatus maps an error to an HTTP status and a gRPC code: the gateway's own, or the
// client library's documented mapping (shmclient.HTTPStatus, GRPCCode), in which what the
// caller can do about it (fix the request, retry later, report a bug) decides the class.
func errorStatus(err error) (int, codes.Code) {
	var re *requestError
	if errors.As(err, &re) {
		return re.status, re.code
	}
	return shmclient.HTTPStatus(err), codes.Code(shmclient.GRPCCode(err))
}
