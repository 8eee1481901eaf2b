package shmclient

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Every error returned by this package wraps one of them, so callers
// branch with errors.Is and never on message text. Errors the daemon reports (SPEC §6)
// are *DaemonError values whose Is method maps the code to the matching sentinel.
//
// Which sentinels an error matches:
//
//   - The daemon's errors (*DaemonError) match the sentinel of their code (see Code*),
//     and DEADLINE also context.DeadlineExceeded.
//   - No daemon at the socket (Dial, or a reconnect that failed): ErrUnavailable and, for
//     callers written before it existed, ErrClosed; also the system call's error
//     (syscall.ENOENT: no socket file; syscall.ECONNREFUSED: a socket file nobody
//     listens on).
//   - A call whose context ended while the Client was reconnecting: ctx.Err()
//     (context.DeadlineExceeded or context.Canceled), ErrUnavailable and ErrClosed.
//   - A session that ended under a call: ErrClosed, plus ErrShuttingDown when the daemon
//     said goodbye, or the *DaemonError of a fatal error. A request the daemon draining
//     (stopping) would not take: ErrShuttingDown.
//   - The Client closed (Close, WithReconnect(false) and its session ended, or
//     WithMaxReconnects reached): ErrClosed.
//   - A context that ended during a call: ctx.Err().
//
// # Retry safety
//
// Every error returned by a call also says whether the request certainly did not run
// (SafeToRetry reports true) or may have run (it matches ErrMayHaveRun); exactly one of
// the two holds. A request certainly did not run when it never left the client (refused
// by the client's checks, its context ended or its session ended or drained before it
// was sent, no session could be had), or when the daemon answered it with an error of
// SPEC §6 marked "ran? no" (UNKNOWN_MODEL, BAD_INPUT, BAD_REQUEST, DEADLINE: it expired
// in the queue, OVERLOADED, SHUTTING_DOWN: the daemon was draining before it started,
// ...). It may have run when the daemon answered MODEL_FAILED, TOO_LARGE (a response too
// large for the ring is refused after the model ran) or INTERNAL, or
// when it was sent and then its context or its session ended before the response was
// read (the daemon was killed, say). ErrBadInput is safe to retry whether this client or
// the daemon found it; ErrTooLarge is when this client refused the request before
// sending it, and may have run when the daemon answered it (its response was too large).
//
// Whether a retry can succeed is the other question, answered by Retryable, a property of
// the error's code wherever it was found (SPEC §6 "Worth retrying"): only transient errors (ErrOverloaded, ErrShuttingDown, ErrResource, ErrUnavailable, a
// session that ended before the call was sent) are worth making again unchanged; bad
// input, an unknown model or a request too large fail again. WithRetry(true) makes the
// retries that can succeed by themselves, and a request to an idempotent model that may
// have run is made again once after a reconnect (WithIdempotentRetry).
var (
	// ErrClosed: the session is over, because Close was called, the daemon closed the
	// connection (it died, restarted or shut down) or a fatal protocol error occurred.
	// With WithReconnect (the default) the Client goes on with a new session; calls that
	// were sent on the old one fail with ErrClosed and ErrMayHaveRun.
	ErrClosed = errors.New("shmclient: connection closed")
	// ErrUnavailable: no session with the daemon could be had: nothing listens at the
	// socket (the daemon is not running, or is restarting), or the Client was reconnecting
	// when the call's context ended. It wraps the system call's error, and errors
	// matching it match ErrClosed too.
	ErrUnavailable = errors.New("shmclient: daemon unavailable")
	// ErrMayHaveRun: the request may have run in the daemon, so running it again may run
	// it twice (see Retry safety above). SafeToRetry reports false for these errors.
	ErrMayHaveRun = errors.New("shmclient: request may have run")
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
	// reserves at the handshake), or the daemon has max_sessions sessions already. As a
	// request's error: the daemon lacked the memory to run it then, and did not run it.
	ErrResource = errors.New("shmclient: daemon out of resources")
	// ErrProtocol: one side broke the wire contract (BAD_FRAME, BAD_MESSAGE, BAD_RECORD, or
	// a malformed frame, record or descriptor read by this client).
	ErrProtocol = errors.New("shmclient: protocol error")
	// ErrShuttingDown: the daemon is stopping and takes no new work (SHUTTING_DOWN, or
	// its draining message), or said goodbye.
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

	// What the error is about, for programs (SPEC §6 "Error fields"; protocol 5 daemons):
	// the input's name ("" when it names none), the index of the item in it (the image or
	// text of a Bytes input; -1 when it names none), and the limit the request went past
	// (bytes, pixels, items, as the message says; 0 when it names none).
	Input string
	Item  int
	Limit uint64
}

func (e *DaemonError) Error() string {
	return fmt.Sprintf("shmclient: daemon error %s (%d): %s", e.Name, e.Code, e.Message)
}

// Is maps the code to its sentinel. DEADLINE also matches context.DeadlineExceeded, so
// callers that only check the context's error treat both kinds of timeout alike. An error
// that answered a request matches ErrMayHaveRun when its code is "ran? may" in SPEC §6; a
// fatal one is about the session, not a request, and does not.
func (e *DaemonError) Is(target error) bool {
	if e.Code == CodeDeadline && target == context.DeadlineExceeded {
		return true
	}
	if target == ErrMayHaveRun {
		return !e.Fatal && !notRunCodes[e.Code]
	}
	s, ok := codeSentinels[e.Code]
	if !ok {
		s = ErrInternal
	}
	return target == s
}

// SafeToRetry reports whether the code is "ran? no" in SPEC §6: the daemon guarantees the
// model did not run for the request it answered.
func (e *DaemonError) SafeToRetry() bool { return notRunCodes[e.Code] }

// notRunCodes are the codes of SPEC §6 whose "ran?" is "no".
var notRunCodes = map[uint64]bool{
	CodeBadFrame: true, CodeVersion: true, CodeBadMessage: true, CodeUnknownModel: true,
	CodeBadInput: true, CodeResource: true, CodePermission: true,
	CodeBadRequest: true, CodeDeadline: true, CodeOverloaded: true, CodeShuttingDown: true,
	CodeUnsupported: true,
}

// Retryable reports whether the request err failed is worth making again unchanged: it
// certainly did not run (SafeToRetry) and its cause is transient (SPEC §6 "Worth
// retrying"): the model's queue was full (ErrOverloaded), the daemon was stopping
// (ErrShuttingDown) or short of memory (ErrResource), no daemon was there
// (ErrUnavailable), or the session ended before the request was sent (ErrClosed, but not
// after Close). Bad input, an unknown model, a request too large and the like report
// false wherever they were found: sending them again fails again. Back off between
// attempts; WithRetry does this within Infer.
func Retryable(err error) bool {
	if !SafeToRetry(err) || errors.Is(err, errClientClosed) {
		return false
	}
	for _, permanent := range []error{ErrBadInput, ErrBadRequest, ErrUnknownModel, ErrTooLarge,
		ErrPermission, ErrVersion, ErrUnsupported, ErrProtocol, ErrDeadline} {
		if errors.Is(err, permanent) {
			return false
		}
	}
	for _, transient := range []error{ErrOverloaded, ErrShuttingDown, ErrResource, ErrUnavailable, ErrClosed} {
		if errors.Is(err, transient) {
			return true
		}
	}
	return false
}

// SafeToRetry reports whether err says that the request it failed certainly did not run
// in the daemon, so that making it again cannot run it twice: it never left the client,
// or the daemon answered it with an error of SPEC §6 marked "ran? no" (see Retry safety
// above). It reports false for nil, for errors that match ErrMayHaveRun and for errors
// this package did not return. Whether a retry can succeed is another matter: a request
// refused as ErrBadInput by the client is safe to retry and fails again.
//
//	out, err := c.Infer(ctx, "mlp", x)
//	if err != nil && shmclient.SafeToRetry(err) && errors.Is(err, shmclient.ErrOverloaded) {
//		// back off and try again
//	}
func SafeToRetry(err error) bool {
	var r interface{ SafeToRetry() bool }
	return errors.As(err, &r) && r.SafeToRetry()
}

// notRunError marks an error after which the request certainly did not run. gone: it
// failed because its session ended or drained before the request was sent, so the Client
// may make it on the next session by itself.
type notRunError struct {
	err  error
	gone bool
}

func (e *notRunError) Error() string     { return e.err.Error() }
func (e *notRunError) Unwrap() error     { return e.err }
func (e *notRunError) SafeToRetry() bool { return true }

// mayHaveRunError marks an error after which the request may have run.
type mayHaveRunError struct{ err error }

func (e *mayHaveRunError) Error() string        { return e.err.Error() }
func (e *mayHaveRunError) Unwrap() error        { return e.err }
func (e *mayHaveRunError) SafeToRetry() bool    { return false }
func (e *mayHaveRunError) Is(target error) bool { return target == ErrMayHaveRun }

// classified reports whether err already says whether its request ran: it carries a
// mark, or it is the daemon's answer to the request. A fatal DaemonError is not: it is
// the cause of a session's end, which says nothing about one request.
func classified(err error) bool {
	var nr *notRunError
	var mr *mayHaveRunError
	var de *DaemonError
	return errors.As(err, &nr) || errors.As(err, &mr) || errors.As(err, &de) && !de.Fatal
}

// notRun marks err (unless it is nil or already says) as an error after which the request
// certainly did not run.
func notRun(err error) error {
	if err == nil || classified(err) {
		return err
	}
	return &notRunError{err: err}
}

// mayHaveRun marks err (unless it is nil or already says) as an error after which the
// request may have run.
func mayHaveRun(err error) error {
	if err == nil || classified(err) {
		return err
	}
	return &mayHaveRunError{err: err}
}

// isGone reports whether err failed a request that was not sent because its session
// ended or drained first.
func isGone(err error) bool {
	var nr *notRunError
	return errors.As(err, &nr) && nr.gone
}

// errClientClosed is why calls fail once Close was called.
var errClientClosed = &closedError{msg: "shmclient: client closed"}

// errDraining is why new work is not sent on a session whose daemon is draining.
var errDraining = fmt.Errorf("%w: the daemon is draining (stopping)", ErrShuttingDown)

// unavailableError: nothing listens at the socket. It matches ErrUnavailable, ErrClosed
// and the dialer's error (with the system call's).
type unavailableError struct {
	path string
	err  error
}

func (e *unavailableError) Error() string {
	var errno syscall.Errno
	if errors.As(e.err, &errno) && (errno == syscall.ENOENT || errno == syscall.ECONNREFUSED) {
		return fmt.Sprintf("shmclient: no tensord daemon at %s: connect: %v (start one with `tensord serve`, or point TENSORD_SOCKET at its socket)", e.path, errno)
	}
	return fmt.Sprintf("shmclient: cannot connect to the tensord daemon at %s: %v", e.path, syscallErr(e.err))
}

func (e *unavailableError) Unwrap() []error   { return []error{ErrUnavailable, ErrClosed, e.err} }
func (e *unavailableError) SafeToRetry() bool { return true }

// syscallErr returns the system call's error inside a dialer's error, or err.
func syscallErr(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return err
}

// noSessionError: a call's context ended while the Client had no session to send it on,
// or (ctxErr nil) it had none and WithFailFast said not to wait.
type noSessionError struct {
	ctxErr error // the context's error; nil: failed fast
	last   error // why there was no session: the last session's end, or the last dial's failure
}

func (e *noSessionError) Error() string {
	if e.ctxErr == nil {
		msg := "shmclient: no session with the daemon (WithFailFast: not waiting for one)"
		if e.last != nil {
			msg += ": " + e.last.Error()
		}
		return msg
	}
	msg := "shmclient: no session with the daemon before the context ended"
	if e.last != nil {
		msg += " (reconnecting: " + e.last.Error() + ")"
	}
	return msg + ": " + e.ctxErr.Error()
}

func (e *noSessionError) Unwrap() []error {
	errs := []error{ErrUnavailable, ErrClosed}
	if e.ctxErr != nil {
		errs = append(errs, e.ctxErr)
	}
	if e.last != nil {
		errs = append(errs, e.last)
	}
	return errs
}

func (e *noSessionError) SafeToRetry() bool { return true }

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
