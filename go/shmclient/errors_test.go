package shmclient

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
)

// specRan reads SPEC §6's table: code → whether its "ran?" column says "no".
func specRan(t *testing.T) map[uint64]bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(vectorsDir, "..", "SPEC.md"))
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\|\\s*(\\d+)\\s*\\|\\s*`[A-Z_]+`\\s*\\|[^|]*\\|\\s*(no|may)\\s*\\|")
	notRun := map[uint64]bool{}
	for _, m := range row.FindAllStringSubmatch(string(b), -1) {
		code, _ := strconv.ParseUint(m[1], 10, 64)
		notRun[code] = m[2] == "no"
	}
	if len(notRun) != CodeInternal {
		t.Fatalf("read %d error codes from SPEC §6, want %d", len(notRun), CodeInternal)
	}
	return notRun
}

// checkRetrySafety: exactly one of SafeToRetry and ErrMayHaveRun holds.
func checkRetrySafety(t *testing.T, what string, err error, safe bool) {
	t.Helper()
	if got := SafeToRetry(err); got != safe {
		t.Errorf("%s: SafeToRetry(%v) = %v, want %v", what, err, got, safe)
	}
	if got := errors.Is(err, ErrMayHaveRun); got == safe {
		t.Errorf("%s: errors.Is(%v, ErrMayHaveRun) = %v, want %v", what, err, got, !safe)
	}
}

// TestDaemonErrorRetrySafety: each code answers as SPEC §6's "ran?" column says, as the
// daemon's answer to a request, wrapped or not; a code this client does not know may
// have run.
func TestDaemonErrorRetrySafety(t *testing.T) {
	for code, notRun := range specRan(t) {
		e := &DaemonError{Code: code, Name: "X", Message: "m"}
		checkRetrySafety(t, fmt.Sprint("code ", code), e, notRun)
		checkRetrySafety(t, fmt.Sprint("wrapped code ", code), fmt.Errorf("shmclient: ping: %w", e), notRun)
	}
	checkRetrySafety(t, "unknown code", &DaemonError{Code: 99}, false)
}

// TestRetrySafetyMarks: the marks the client puts on errors decide, whatever they wrap,
// and a mark already there is kept.
func TestRetrySafetyMarks(t *testing.T) {
	fatal := &DaemonError{Code: CodeBadRecord, Name: "BAD_RECORD", Fatal: true}
	ended := &closedError{msg: "shmclient: the daemon ended the session with a fatal error", cause: fatal}
	gone := &unavailableError{path: "/x.sock", err: &os.SyscallError{Syscall: "connect", Err: syscall.ENOENT}}
	overloaded := &DaemonError{Code: CodeOverloaded, Name: "OVERLOADED"}
	failed := &DaemonError{Code: CodeModelFailed, Name: "MODEL_FAILED"}
	for _, tc := range []struct {
		what string
		err  error
		safe bool
	}{
		{"not sent, session ended by a fatal error", notRun(ended), true},
		{"sent, session ended by a fatal error", mayHaveRun(ended), false},
		{"sent, context ended", mayHaveRun(fmt.Errorf("shmclient: model %q: %w", "m", context.Canceled)), false},
		{"not sent, context ended", notRun(context.DeadlineExceeded), true},
		{"no daemon", gone, true},
		{"no session before the deadline", &noSessionError{ctxErr: context.DeadlineExceeded, last: gone}, true},
		{"the daemon's answer is kept (not run)", mayHaveRun(overloaded), true},
		{"the daemon's answer is kept (may have run)", notRun(failed), false},
		{"a mark is kept", mayHaveRun(notRun(ended)), true},
		{"nil", nil, false},
		{"not this package's", errors.New("x"), false},
	} {
		if tc.err == nil || tc.what == "not this package's" {
			if SafeToRetry(tc.err) {
				t.Errorf("%s: SafeToRetry is true", tc.what)
			}
			continue
		}
		checkRetrySafety(t, tc.what, tc.err, tc.safe)
	}
	if notRun(overloaded) != error(overloaded) {
		t.Error("notRun wrapped the daemon's answer")
	}
	nse := &noSessionError{ctxErr: context.DeadlineExceeded, last: gone}
	for _, target := range []error{context.DeadlineExceeded, ErrUnavailable, ErrClosed, syscall.ENOENT} {
		if !errors.Is(nse, target) {
			t.Errorf("%v does not match %v", nse, target)
		}
	}
}

// TestClassificationIsTheCode: an error of a code is classified alike wherever it was
// found (issue 17 item 3): bad input this client refused before sending and bad input the
// daemon answered are both safe to retry and neither worth retrying; transient errors are
// worth retrying, from the daemon or from the client.
func TestClassificationIsTheCode(t *testing.T) {
	c := &Client{} // Infer's own checks refuse before any session is touched
	_, clientFound := c.Infer(context.Background(), "mlp", Tensor{Name: "x", DType: F32, Shape: []int64{2}, Data: make([]byte, 3)})
	if !errors.Is(clientFound, ErrBadInput) {
		t.Fatalf("client's check: %v", clientFound)
	}
	daemonFound := fmt.Errorf("shmclient: model %q: %w", "mlp", daemonError(CodeBadInput, "BAD_INPUT", "input 'x': shape [2]", false, "x", nil, nil))
	for what, err := range map[string]error{"client": clientFound, "daemon": daemonFound} {
		checkRetrySafety(t, "bad input found by the "+what, err, true)
		if Retryable(err) {
			t.Errorf("bad input found by the %s: Retryable", what)
		}
	}
	gone := &unavailableError{path: "/x.sock", err: &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}}
	for _, tc := range []struct {
		err       error
		retryable bool
	}{
		{&DaemonError{Code: CodeOverloaded}, true},
		{&DaemonError{Code: CodeShuttingDown}, true},
		{&DaemonError{Code: CodeResource}, true},
		{&DaemonError{Code: CodeUnknownModel}, false},
		{&DaemonError{Code: CodeTooLarge}, false},
		{&DaemonError{Code: CodeDeadline}, false},
		{&DaemonError{Code: CodeModelFailed}, false},
		{gone, true},
		{&noSessionError{last: gone}, true},
		{&notRunError{err: &closedError{msg: "session ended", cause: ErrShuttingDown}, gone: true}, true},
		{notRun(errClientClosed), false},
		{mayHaveRun(&closedError{msg: "session ended"}), false},
	} {
		if got := Retryable(tc.err); got != tc.retryable {
			t.Errorf("Retryable(%v) = %v, want %v", tc.err, got, tc.retryable)
		}
	}
}

// TestErrorFields: the fields of a protocol 5 error reach DaemonError, and an error that
// names no item says -1.
func TestErrorFields(t *testing.T) {
	item, limit := uint64(3), uint64(1<<20)
	e := daemonError(CodeBadInput, "BAD_INPUT", "input 'text' item 3: too long", false, "text", &item, &limit)
	if e.Input != "text" || e.Item != 3 || e.Limit != 1<<20 {
		t.Fatalf("%+v", e)
	}
	if e := daemonError(CodeOverloaded, "OVERLOADED", "full", false, "", nil, nil); e.Input != "" || e.Item != -1 || e.Limit != 0 {
		t.Fatalf("%+v", e)
	}
}
