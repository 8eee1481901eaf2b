package shmclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// What a service needs before production (issue 17): starting before the daemon, failing
// fast during an outage, idempotent requests in flight at a SIGKILL, metadata and outputs
// by name. Real daemons on sockets of the tests' own.

type inferResult struct {
	out Tensors
	err error
}

func TestRetryOnFailedConnect(t *testing.T) {
	needDaemon(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "later.sock")
	ctx := testCtx(t)
	if _, err := Dial(ctx, sock); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Dial without a daemon, default options: %v, want ErrUnavailable", err)
	}
	waits := []Option{WithReconnectWait(20 * time.Millisecond), WithMaxReconnectWait(200 * time.Millisecond)}
	connected := make(chan struct{}, 1)
	c, err := Dial(ctx, sock, append(waits, WithRetryOnFailedConnect(true),
		WithReconnectHandler(func() { connected <- struct{}{} }))...)
	if err != nil {
		t.Fatalf("Dial with WithRetryOnFailedConnect: %v", err)
	}
	defer c.Close()
	fast, err := Dial(ctx, sock, append(waits, WithRetryOnFailedConnect(true), WithFailFast(true))...)
	if err != nil {
		t.Fatal(err)
	}
	defer fast.Close()
	if c.Connected() || fast.Connected() {
		t.Fatal("Connected before any daemon")
	}
	x := FromInt32("x", []int64{3}, []int32{7, 8, 9})
	start := time.Now()
	_, err = fast.Infer(ctx, "identity", x)
	if !errors.Is(err, ErrUnavailable) || !Retryable(err) || !SafeToRetry(err) {
		t.Fatalf("fail-fast call without a daemon: %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("the fail-fast call took %v", took)
	}
	if HTTPStatus(err) != 503 {
		t.Fatalf("HTTPStatus(%v) = %d", err, HTTPStatus(err))
	}

	done := make(chan inferResult, 1)
	go func() {
		out, err := c.Infer(ctx, "identity", x)
		done <- inferResult{out, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("Infer returned before there was a daemon: %v", r.err)
	case <-time.After(300 * time.Millisecond):
	}
	d, err := startDaemonOn(dir, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer d.kill(syscall.SIGKILL)
	r := <-done
	if r.err != nil || !bytes.Equal(r.out[0].Data, x.Data) {
		t.Fatalf("the waiting call, once the daemon came: %v %v", r.out, r.err)
	}
	<-connected
	if !c.Connected() {
		t.Fatal("not Connected after its first session")
	}
	for !fast.Connected() {
		if ctx.Err() != nil {
			t.Fatal("the fail-fast Client never connected")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if out, err := fast.Infer(ctx, "identity", x); err != nil || !bytes.Equal(out[0].Data, x.Data) {
		t.Fatalf("fail-fast Client once connected: %v %v", out, err)
	}
}

const gateConfig = `
[[models]]
name = "gate"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
idempotent = true
options = { dir = %q }

[[models]]
name = "gate_once"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
options = { dir = %q }
`

// TestIdempotentReplayAfterSIGKILL: a request to an idempotent model in flight when the
// daemon is killed is made again on the next daemon and answered there; one to a model
// that is not idempotent fails with ErrMayHaveRun.
func TestIdempotentReplayAfterSIGKILL(t *testing.T) {
	needDaemon(t)
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, g := range []string{a, b} {
		if err := os.Mkdir(g, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg := filepath.Join(dir, "gates.toml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(gateConfig, a, b)), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "d.sock")
	d, err := startDaemonOn(dir, sock, "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { d.kill(syscall.SIGKILL) }()
	ctx := testCtx(t)
	c, err := Dial(ctx, sock, WithReconnectWait(20*time.Millisecond), WithMaxReconnectWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if m, err := c.Model(ctx, "gate"); err != nil || !m.Idempotent {
		t.Fatalf("gate: %+v %v", m, err)
	}
	if m, err := c.Model(ctx, "gate_once"); err != nil || m.Idempotent {
		t.Fatalf("gate_once: %+v %v", m, err)
	}
	call := func(model string, v []float32) <-chan inferResult {
		ch := make(chan inferResult, 1)
		go func() {
			out, err := c.Infer(ctx, model, FromFloat32("x", []int64{int64(len(v))}, v))
			ch <- inferResult{out, err}
		}()
		return ch
	}
	idem, once := call("gate", []float32{1, 2}), call("gate_once", []float32{3})
	for _, g := range []string{a, b} {
		waitFile(t, ctx, filepath.Join(g, "started"))
	}
	d.kill(syscall.SIGKILL)
	for _, g := range []string{a, b} { // the next daemon answers at once, and differently
		os.WriteFile(filepath.Join(g, "value"), []byte("100"), 0o644)
		os.WriteFile(filepath.Join(g, "open"), nil, 0o644)
	}
	if d, err = startDaemonOn(dir, sock, "--config", cfg); err != nil {
		t.Fatal(err)
	}
	r := <-idem
	if r.err != nil {
		t.Fatalf("idempotent request in flight at SIGKILL: %v", r.err)
	}
	if y, err := r.out.Get("y"); err != nil || fmt.Sprint(y.Float32s()) != "[101 102]" {
		t.Fatalf("answer from the next daemon: %v %v", y, err)
	}
	r = <-once
	if !errors.Is(r.err, ErrMayHaveRun) || !errors.Is(r.err, ErrClosed) || SafeToRetry(r.err) {
		t.Fatalf("request to a model that is not idempotent: %v", r.err)
	}
}

func waitFile(t *testing.T, ctx context.Context, path string) {
	t.Helper()
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%s never appeared", path)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestModelOutputsByNameCheckedViews: Client.Model (cached metadata with Check), outputs
// by name, typed views that return errors instead of panicking.
func TestModelOutputsByNameCheckedViews(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	m, err := c.Model(ctx, "mlp")
	if err != nil || m.Name != "mlp" || !m.Idempotent || len(m.Inputs) != 1 {
		t.Fatalf("Model(mlp): %+v %v", m, err)
	}
	m.Inputs[0].Name = "changed" // the caller's copy: the cache keeps its own
	again, err := c.Model(ctx, "mlp")
	if err != nil || again.Inputs[0].Name != "x" {
		t.Fatalf("the cache was changed through a returned ModelInfo: %+v %v", again, err)
	}
	if err := again.Check(FromFloat32("x", []int64{1, 15}, make([]float32, 15))); !errors.Is(err, ErrBadInput) {
		t.Fatalf("Check of a wrong shape: %v", err)
	}
	if _, err := c.Model(ctx, "nope"); !errors.Is(err, ErrUnknownModel) || Retryable(err) {
		t.Fatalf("Model(nope): %v", err)
	}
	out, err := c.Infer(ctx, "mlp", FromFloat32("x", []int64{1, 16}, make([]float32, 16)))
	if err != nil {
		t.Fatal(err)
	}
	y, err := out.Get("y")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := out.Get("z"); err == nil {
		t.Fatal("Get of an output that is not there")
	}
	if _, ok := out.Lookup("z"); ok {
		t.Fatal("Lookup of an output that is not there")
	}
	if v, err := y.AsFloat32s(); err != nil || len(v) != 4 {
		t.Fatalf("AsFloat32s: %v %v", v, err)
	}
	if _, err := y.AsInt64s(); err == nil {
		t.Fatal("AsInt64s of an f32 tensor did not fail")
	}
	if _, err := y.AsBools(); err == nil {
		t.Fatal("AsBools of an f32 tensor did not fail")
	}
	if _, err := y.AsFloat32sFromHalf(); err == nil {
		t.Fatal("AsFloat32sFromHalf of an f32 tensor did not fail")
	}
}

func TestHTTPAndGRPCStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		http int
		grpc uint32
	}{
		{nil, 200, 0},
		{&DaemonError{Code: CodeBadInput}, 400, grpcInvalidArgument},
		{badInputf("client found it"), 400, grpcInvalidArgument},
		{&DaemonError{Code: CodeUnknownModel}, 404, grpcNotFound},
		{&DaemonError{Code: CodeTooLarge}, 413, grpcResourceExhausted},
		{&DaemonError{Code: CodeOverloaded}, 429, grpcResourceExhausted},
		{&DaemonError{Code: CodeDeadline}, 504, grpcDeadlineExceeded},
		{&DaemonError{Code: CodeShuttingDown}, 503, grpcUnavailable},
		{&noSessionError{}, 503, grpcUnavailable},
		{&noSessionError{ctxErr: context.DeadlineExceeded}, 503, grpcUnavailable},
		{context.Canceled, 499, grpcCanceled},
		{&DaemonError{Code: CodeModelFailed}, 500, grpcInternal},
		{errors.New("other"), 500, grpcInternal},
	} {
		if h, g := HTTPStatus(tc.err), GRPCCode(tc.err); h != tc.http || g != tc.grpc {
			t.Errorf("%v: HTTP %d gRPC %d, want %d %d", tc.err, h, g, tc.http, tc.grpc)
		}
	}
}
