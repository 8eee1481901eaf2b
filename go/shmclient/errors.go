package shmclient

import (
	"context"
	"errors"
	"fmt"
)

// Sentinel errors. Every error returned by this package wraps one of them, so callers
// branch with errors.Is and never on message text. Errors the daemon reports (SPEC §6)
// are *DaemonError values whose Is method maps the code to the matching sentinel.
var (
	// ErrClosed: the session is over, because Close was called, the daemon closed the
	// connection (it died, restarted or shut down) or a fatal protocol error occurred.
	// Dial a new Client to go on.
	ErrClosed = errors.New("shmclient: connection closed")
	// ErrUnknownModel: the daemon serves no model of that name (UNKNOWN_MODEL).
	ErrUnknownModel = errors.New("shmclient: unknown model")
	// ErrTooLarge: a record or frame exceeds a limit, typically a ring's capacity (TOO_LARGE).
	ErrTooLarge = errors.New("shmclient: too large")
	// ErrBadInput: the inputs do not fit the model's signature or the SPEC's rules (BAD_INPUT).
	ErrBadInput = errors.New("shmclient: bad input")
	// ErrBadRequest: the daemon could not parse a request descriptor (BAD_REQUEST).
	ErrBadRequest = errors.New("shmclient: bad request")
	// ErrModelFailed: the model raised or returned outputs that break its signature (MODEL_FAILED).
	ErrModelFailed = errors.New("shmclient: model failed")
	// ErrDeadline: the request's time budget ran out before the model ran (DEADLINE).
	ErrDeadline = errors.New("shmclient: deadline exceeded in daemon")
	// ErrOverloaded: the model's queue is full; retry later or with backoff (OVERLOADED).
	ErrOverloaded = errors.New("shmclient: daemon overloaded")
	// ErrPermission: the peer may not do this, or shared memory cannot be given to it (PERMISSION).
	ErrPermission = errors.New("shmclient: permission denied")
	// ErrVersion: client and daemon share no protocol version (VERSION).
	ErrVersion = errors.New("shmclient: no common protocol version")
	// ErrResource: the daemon cannot create the session (RESOURCE): the host or the
	// daemon's cgroup lacks the memory for its segment (a memfd whose pages the daemon
	// reserves at the handshake), or the daemon has max_sessions sessions already.
	ErrResource = errors.New("shmclient: daemon out of resources")
	// ErrProtocol: one side broke the wire contract (BAD_FRAME, BAD_MESSAGE, BAD_RECORD, or
	// a malformed frame, record or descriptor read by this client).
	ErrProtocol = errors.New("shmclient: protocol error")
	// ErrShuttingDown: the daemon is stopping and takes no new work (SHUTTING_DOWN).
	ErrShuttingDown = errors.New("shmclient: daemon shutting down")
	// ErrUnsupported: the daemon knows the message but does not implement it (UNSUPPORTED).
	ErrUnsupported = errors.New("shmclient: unsupported by daemon")
	// ErrInternal: a bug in the daemon; the message says what happened (INTERNAL).
	ErrInternal = errors.New("shmclient: daemon internal error")
)

// Error codes of SPEC §6.
const (
	CodeBadFrame     = 1
	CodeVersion      = 2
	CodeBadMessage   = 3
	CodeUnknownModel = 4
	CodeBadInput     = 5
	CodeTooLarge     = 6
	CodeResource     = 7
	CodePermission   = 8
	CodeModelFailed  = 9
	CodeBadRecord    = 10
	CodeBadRequest   = 11
	CodeDeadline     = 12
	CodeOverloaded   = 13
	CodeShuttingDown = 14
	CodeUnsupported  = 15
	CodeInternal     = 16
)

var codeSentinels = map[uint64]error{
	CodeBadFrame:     ErrProtocol,
	CodeVersion:      ErrVersion,
	CodeBadMessage:   ErrProtocol,
	CodeUnknownModel: ErrUnknownModel,
	CodeBadInput:     ErrBadInput,
	CodeTooLarge:     ErrTooLarge,
	CodeResource:     ErrResource,
	CodePermission:   ErrPermission,
	CodeModelFailed:  ErrModelFailed,
	CodeBadRecord:    ErrProtocol,
	CodeBadRequest:   ErrBadRequest,
	CodeDeadline:     ErrDeadline,
	CodeOverloaded:   ErrOverloaded,
	CodeShuttingDown: ErrShuttingDown,
	CodeUnsupported:  ErrUnsupported,
	CodeInternal:     ErrInternal,
}

// DaemonError is an error reported by the daemon, either in an error control message or
// in a response record. errors.Is(err, ErrUnknownModel) etc. match it by Code; a code this
// client does not know matches ErrInternal so that it is never silently treated as success.
type DaemonError struct {
	Code    uint64 // SPEC §6 code
	Name    string // code name as sent, e.g. "UNKNOWN_MODEL"
	Message string // what was wrong and what to do, for people
	Fatal   bool   // the daemon closes the connection after it
}

func (e *DaemonError) Error() string {
	return fmt.Sprintf("shmclient: daemon error %s (%d): %s", e.Name, e.Code, e.Message)
}

// Is maps the code to its sentinel. DEADLINE also matches context.DeadlineExceeded, so
// callers that only check the context's error treat both kinds of timeout alike.
func (e *DaemonError) Is(target error) bool {
	if e.Code == CodeDeadline && target == context.DeadlineExceeded {
		return true
	}
	s, ok := codeSentinels[e.Code]
	if !ok {
		s = ErrInternal
	}
	return target == s
}

// closedError is the error every call gets once the session is over. It wraps ErrClosed
// and, when there is one, the cause (a fatal DaemonError, an I/O error, a goodbye).
type closedError struct {
	msg   string
	cause error
}

func (e *closedError) Error() string {
	if e.cause != nil {
		return e.msg + ": " + e.cause.Error()
	}
	return e.msg
}

func (e *closedError) Unwrap() []error {
	if e.cause != nil {
		return []error{ErrClosed, e.cause}
	}
	return []error{ErrClosed}
}

func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}

func badInputf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadInput}, args...)...)
}
