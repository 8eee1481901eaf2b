package shmclient

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tensord/tensord/go/shmclient/internal/shmtest"
)

// openFDs lists this process's open descriptors and what they are.
func openFDs(t testing.TB) map[string]string {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	fds := make(map[string]string, len(entries))
	for _, e := range entries {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		fds[e.Name()] = target
	}
	return fds
}

// leakedSegments lists the descriptors of the memfds made for one case.
func leakedSegments(fds map[string]string, name string) []string {
	var out []string
	for fd, target := range fds {
		if strings.HasPrefix(target, "/memfd:tensord-fake-"+name+" ") {
			out = append(out, fd+" -> "+target)
		}
	}
	return out
}

// sameFDs fails unless the process has the descriptors it had before (by number and
// target), with their differences.
func sameFDs(t testing.TB, before, after map[string]string, what string) {
	t.Helper()
	var diff []string
	for fd, target := range after {
		if before[fd] != target {
			diff = append(diff, "+ "+fd+" -> "+target)
		}
	}
	for fd, target := range before {
		if _, ok := after[fd]; !ok {
			diff = append(diff, "- "+fd+" -> "+target)
		}
	}
	if len(diff) > 0 {
		t.Errorf("%s: descriptors differ (%d before, %d after):\n%s", what, len(before), len(after), strings.Join(diff, "\n"))
	}
}

// TestHandshakeClosesDescriptors: whichever way the handshake fails once the welcome has
// brought descriptors, Dial leaves none of them open.
func TestHandshakeClosesDescriptors(t *testing.T) {
	sendMsg := func(msg any) func(net.Conn) {
		return func(conn net.Conn) {
			if _, err := readFrame(conn, maxFrame); err != nil { // attached
				return
			}
			writeFrame(conn, msg)
		}
	}
	// newFD makes an extra descriptor for a case, which the fake daemon closes once sent.
	// It runs on the fake daemon's goroutine: no t.Fatal.
	newFD := func(t testing.TB, make func() (int, error)) int {
		fd, err := make()
		if err != nil {
			t.Error(err)
		}
		return fd
	}
	memfd := func(t testing.TB) int {
		return newFD(t, func() (int, error) { return shmtest.Memfd("tensord-fake-extra", 4096, nil) })
	}
	cases := []fakeSession{
		{name: "version", welcome: func(w *welcomeMsg) { w.Version = 2 }, want: ErrProtocol},
		{name: "no-descriptors", fds: func(testing.TB, int, [4]int) []int { return nil }, want: ErrProtocol},
		{name: "segment-only", fds: func(_ testing.TB, seg int, _ [4]int) []int { return []int{seg} }, want: ErrProtocol},
		{name: "three-eventfds", fds: func(_ testing.TB, seg int, e [4]int) []int { return []int{seg, e[0], e[1], e[2]} }, want: ErrProtocol},
		{name: "five-eventfds", fds: func(t testing.TB, seg int, e [4]int) []int {
			return []int{seg, e[0], e[1], e[2], e[3], newFD(t, shmtest.Eventfd)}
		}, want: ErrProtocol},
		{name: "too-many", fds: func(t testing.TB, seg int, e [4]int) []int {
			fds := []int{seg, e[0], e[1], e[2], e[3]}
			for len(fds) <= maxFDs {
				fds = append(fds, newFD(t, shmtest.Eventfd))
			}
			return fds
		}, want: ErrProtocol},
		{name: "memfd-not-eventfd", fds: func(t testing.TB, seg int, e [4]int) []int {
			return []int{seg, e[0], memfd(t), e[2], e[3]}
		}, want: ErrProtocol},
		{name: "segment-last", fds: func(_ testing.TB, seg int, e [4]int) []int { return []int{e[0], e[1], e[2], e[3], seg} }, want: ErrProtocol},
		{name: "blocking-eventfd", fds: func(t testing.TB, seg int, e [4]int) []int {
			return []int{seg, e[0], e[1], e[2], newFD(t, shmtest.BlockingEventfd)}
		}, want: ErrProtocol},
		{name: "size", size: func(n int64) int64 { return n + 4096 }, want: ErrProtocol},
		{name: "header", image: []byte("not a segment"), want: ErrProtocol},
		{name: "error-not-ready", want: ErrResource,
			after: sendMsg(&errorMsg{Type: "error", Code: CodeResource, Name: "RESOURCE", Message: "no", Fatal: true})},
		{name: "goodbye-not-ready", want: ErrShuttingDown,
			after: sendMsg(&goodbyeMsg{Type: "goodbye", Reason: "stopping"})},
		{name: "hang-up-not-ready", want: ErrClosed,
			after: func(conn net.Conn) { readFrame(conn, maxFrame); conn.Close() }},
	}

	d := newFakeDaemon(t)
	dial := func(t *testing.T, fs fakeSession) {
		t.Helper()
		served := d.serveOne(t, fs)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := Dial(ctx, d.path())
		if err == nil {
			c.Close()
			t.Fatalf("Dial succeeded")
		}
		if !errors.Is(err, fs.want) {
			t.Errorf("Dial: %v, want %v", err, fs.want)
		}
		<-served // the fake daemon closed its own copies
	}

	// Once first, so that whatever the runtime opens lazily (the poller, ...) is open
	// before counting.
	dial(t, cases[0])
	before := openFDs(t)
	for _, fs := range cases {
		t.Run(fs.name, func(t *testing.T) {
			dial(t, fs)
			if leaked := leakedSegments(openFDs(t), fs.name); len(leaked) > 0 {
				t.Errorf("segment descriptors left open: %v", leaked)
			}
		})
	}
	sameFDs(t, before, openFDs(t), "after the failed handshakes")
}

// TestFakeSessionCloseLeavesNoFDs: a session that worked leaves no descriptor behind once
// it is closed and its views released (the real daemon's twin is TestCloseLeavesNoFDs).
func TestFakeSessionCloseLeavesNoFDs(t *testing.T) {
	d := newFakeDaemon(t)
	session := func() {
		served := d.serveOne(t, fakeSession{name: "leak"})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := Dial(ctx, d.path())
		if err != nil {
			t.Fatal(err)
		}
		if len(openFDs(t)) < 5 {
			t.Fatal("the session holds fewer descriptors than it should")
		}
		out, err := c.Infer(ctx, "identity", FromUint8("x", []int64{3}, []byte{1, 2, 3}))
		if err != nil || string(out[0].Data) != "\x01\x02\x03" {
			t.Fatalf("Infer: %v, %v", out, err)
		}
		req, err := c.NewRequest(ctx, "identity", TensorSpec{Name: "x", DType: U8, Shape: []int64{2}})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := req.Do(ctx)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		// A view held past Close keeps the mapping and the eventfds.
		if c.sess().seg.efds[efdRespData].fd < 0 {
			t.Error("eventfds closed while a view is held")
		}
		resp.Release()
		<-served
	}
	session() // the runtime's lazily opened descriptors
	before := openFDs(t)
	session()
	sameFDs(t, before, openFDs(t), "after a closed session")
}

// TestCheckEventfd: descriptors 1-4 of the welcome must be non-blocking eventfds.
func TestCheckEventfd(t *testing.T) {
	efd, err := shmtest.Eventfd()
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(efd)
	if err := checkEventfd(efd, "rd"); err != nil {
		t.Errorf("eventfd refused: %v", err)
	}
	bfd, err := shmtest.BlockingEventfd()
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(bfd)
	if err := checkEventfd(bfd, "rd"); !errors.Is(err, ErrProtocol) {
		t.Errorf("blocking eventfd: %v, want ErrProtocol", err)
	}
	mfd, err := shmtest.Memfd("tensord-test-check", 64, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(mfd)
	if err := checkEventfd(mfd, "rd"); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "memfd") {
		t.Errorf("memfd: %v, want ErrProtocol naming it", err)
	}
}
