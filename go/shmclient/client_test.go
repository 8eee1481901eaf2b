package shmclient

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The integration tests run against a real daemon started by TestMain. There is no
// skip switch: without a daemon they fail, with the reason.

var (
	daemonSocket string
	daemonErr    error
)

func pythonPath() string {
	if p := os.Getenv("TENSORD_PYTHON"); p != "" {
		return p
	}
	p, _ := filepath.Abs("../../.venv/bin/python")
	return p
}

type daemonProc struct {
	cmd    *exec.Cmd
	socket string
	log    string
	exited chan struct{}
}

// startDaemon starts `python -m tensord serve --socket dir/d.sock` and waits until the
// socket accepts connections.
func startDaemon(dir string) (*daemonProc, error) {
	return startDaemonOn(dir, filepath.Join(dir, "d.sock"))
}

// startDaemonOn starts a daemon on the socket sock, logging to a new file in dir, and
// waits until the socket accepts connections: how a test restarts a daemon it stopped,
// on the same path.
// Extra arguments go to `tensord serve` (a --config, say); the tests' Python handlers
// (tests/handlers_for_tests.py) are importable by the daemon.
func startDaemonOn(dir, sock string, args ...string) (*daemonProc, error) {
	py := pythonPath()
	if _, err := os.Stat(py); err != nil {
		return nil, fmt.Errorf("no python for the daemon at %s (create the venv at the repository root, or set TENSORD_PYTHON): %v", py, err)
	}
	logf, err := os.CreateTemp(dir, "daemon-*.log")
	if err != nil {
		return nil, err
	}
	logPath := logf.Name()
	defer logf.Close()
	cmd := exec.Command(py, append([]string{"-m", "tensord", "serve", "--socket", sock}, args...)...)
	cmd.Env = append(os.Environ(), "PYTHONPATH="+testsDir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	d := &daemonProc{cmd: cmd, socket: sock, log: logPath, exited: make(chan struct{})}
	started := make(chan error)
	go func() {
		// Pdeathsig fires when the forking thread exits, not the process: pin this
		// goroutine to its thread for the daemon's lifetime so that only the test
		// binary's death (or ours, after the daemon's) kills it.
		runtime.LockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			cmd.Wait()
			close(d.exited)
		}
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("starting %s -m tensord serve: %v", py, err)
	}
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-d.exited:
			out, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("the daemon exited during start-up (%v); its log:\n%s", cmd.ProcessState, out)
		default:
		}
		if conn, err := net.Dial("unix", sock); err == nil {
			conn.Close()
			return d, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.kill(syscall.SIGKILL)
	return nil, fmt.Errorf("the daemon did not accept on %s within 90s", sock)
}

// testsDir holds the Python tests' handlers, which test daemons may serve.
var testsDir, _ = filepath.Abs("../../tests")

func (d *daemonProc) kill(sig syscall.Signal) {
	d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
	}
}

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "shmclient-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	d, err := startDaemon(dir)
	if err != nil {
		daemonErr = err
		// Unit tests still run; integration tests and examples fail with this reason.
		fmt.Fprintf(os.Stderr, "shmclient tests: no daemon: %v\n", err)
		os.Setenv("TENSORD_SOCKET", filepath.Join(dir, "no-daemon.sock"))
	} else {
		defer d.kill(syscall.SIGTERM)
		daemonSocket = d.socket
		os.Setenv("TENSORD_SOCKET", d.socket)
	}
	return m.Run()
}

func needDaemon(t *testing.T) {
	t.Helper()
	if daemonErr != nil {
		t.Fatalf("integration test needs the tensord daemon: %v", daemonErr)
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dialTest(t *testing.T, opts ...Option) *Client {
	t.Helper()
	needDaemon(t)
	c, err := Dial(testCtx(t), "", opts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestDialPingModels(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t)
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	models, err := c.Models(ctx)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]ModelInfo{}
	for _, m := range models {
		byName[m.Name] = m
	}
	id, ok := byName["identity"]
	if !ok || len(id.Inputs) != 1 || id.Inputs[0].Name != "x" || id.Inputs[0].DType != AnyDType || id.Inputs[0].Shape != nil {
		t.Fatalf("identity metadata %+v", id)
	}
	mlp, ok := byName["mlp"]
	if !ok || mlp.Inputs[0].DType != F32 || fmt.Sprint(mlp.Inputs[0].Shape) != "[-1 16]" || fmt.Sprint(mlp.Outputs[0].Shape) != "[-1 4]" {
		t.Fatalf("mlp metadata %+v", mlp)
	}
	if c.Session() == "" || c.Daemon() == "" {
		t.Fatal("no session or daemon name")
	}
}

// TestDialNoDaemon: no socket file, and a socket file nobody listens on (a daemon that
// died): ErrUnavailable with the system call's error, ErrClosed for older callers, safe
// to retry, and a message that says what to run.
func TestDialNoDaemon(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	for _, tc := range []struct {
		path  string
		errno syscall.Errno
	}{{filepath.Join(dir, "nobody.sock"), syscall.ENOENT}, {stale, syscall.ECONNREFUSED}} {
		_, err := Dial(testCtx(t), tc.path)
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrClosed) || !errors.Is(err, tc.errno) {
			t.Errorf("%s: got %v, want ErrUnavailable, ErrClosed and %v", tc.path, err, tc.errno)
		}
		if !SafeToRetry(err) || errors.Is(err, ErrMayHaveRun) {
			t.Errorf("%s: %v: SafeToRetry %v, ErrMayHaveRun %v; want true, false", tc.path, err, SafeToRetry(err), errors.Is(err, ErrMayHaveRun))
		}
		msg := err.Error()
		if !strings.Contains(msg, "`tensord serve`") || !strings.Contains(msg, tc.path) || strings.Contains(strings.ToLower(msg), "python") {
			t.Errorf("%s: message %q should name the socket and `tensord serve`, and nothing of Python", tc.path, msg)
		}
	}
}

// TestCloseLeavesNoFDs: a session holds descriptors (the socket, the four eventfds; the
// segment's is closed once mapped) and gives every one back once it is closed and its
// views are released.
func TestCloseLeavesNoFDs(t *testing.T) {
	needDaemon(t)
	ctx := testCtx(t)
	session := func(check func(before map[string]string, c *Client)) {
		before := openFDs(t)
		c, err := Dial(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		if check != nil {
			check(before, c)
		}
		if _, err := c.Infer(ctx, "identity", FromFloat32("x", []int64{2}, []float32{1, 2})); err != nil {
			t.Fatal(err)
		}
		req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: F32, Shape: []int64{2}})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := req.Do(ctx)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		resp.Release()
	}
	session(nil) // the runtime's lazily opened descriptors
	before := openFDs(t)
	session(func(before map[string]string, c *Client) {
		var eventfds, memfds int
		for fd, target := range openFDs(t) {
			if _, ok := before[fd]; ok {
				continue
			}
			switch {
			case target == "anon_inode:[eventfd]":
				eventfds++
			case strings.HasPrefix(target, "/memfd:"):
				memfds++
			}
		}
		if eventfds != 4 || memfds != 0 {
			t.Errorf("an open session holds %d new eventfds and %d memfds, want 4 and 0", eventfds, memfds)
		}
	})
	sameFDs(t, before, openFDs(t), "after Dial, requests, Close and Release")
}
