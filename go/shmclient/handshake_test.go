package shmclient

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tensord/tensord/go/shmclient/internal/shmtest"
)

// A fake daemon: it answers hello with a welcome of the test's making, sending a real
// memfd with it (SCM_RIGHTS), so that every way a handshake can fail after the segment
// descriptor arrived can be tried.

type fakeWelcome struct {
	name    string
	welcome func(w *welcomeMsg)
	image   []byte                 // the memfd's first bytes (its header)
	fds     int                    // descriptors sent with the welcome (0: 1)
	after   func(conn net.Conn)    // what the daemon does once the welcome is sent
	want    error                  // what Dial's error must wrap
	size    func(size int64) int64 // the memfd's size, given the welcome's
}

// serveFake accepts one connection on ln and plays the daemon's part for fw.
func serveFake(t *testing.T, ln *net.UnixListener, fw fakeWelcome, w welcomeMsg) {
	conn, err := ln.AcceptUnix()
	if err != nil {
		t.Errorf("accept: %v", err)
		return
	}
	defer conn.Close()
	if _, err := readFrame(conn, maxFrame); err != nil {
		t.Errorf("reading hello: %v", err)
		return
	}
	size := int64(w.SegmentSize)
	if fw.size != nil {
		size = fw.size(size)
	}
	n := max(fw.fds, 1)
	fds := make([]int, n)
	for i := range fds {
		fd, err := shmtest.Memfd("tensord-fake-"+fw.name, size, fw.image)
		if err != nil {
			t.Error(err)
			return
		}
		defer syscall.Close(fd) // the client gets its own copy
		fds[i] = fd
	}
	frame, err := appendFrame(nil, &w)
	if err != nil {
		t.Error(err)
		return
	}
	if _, _, err := conn.WriteMsgUnix(frame, syscall.UnixRights(fds...), nil); err != nil {
		t.Errorf("sending the welcome: %v", err)
		return
	}
	if fw.after != nil {
		fw.after(conn)
	}
	io.Copy(io.Discard, conn) // until the client hangs up
}

// openFDs lists this process's open descriptors and what they are.
func openFDs(t *testing.T) map[string]string {
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

// TestHandshakeClosesSegment: whichever way the handshake fails once the welcome has
// brought the segment's descriptor, Dial leaves no descriptor open.
func TestHandshakeClosesSegment(t *testing.T) {
	const ring = 65536
	semBase := "/tensord-fake-" + randomHex(t)
	sems := []string{semBase + "-rd", semBase + "-rs", semBase + "-pd", semBase + "-ps"}
	for _, s := range sems {
		if err := shmtest.CreateSemaphore(s); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { shmtest.UnlinkSemaphore(s) })
	}
	good := welcomeMsg{
		Type: "welcome", Version: protocolVersion, Session: strings.Repeat("ab", 16),
		Semaphores: sems, SegmentSize: headerSize + 2*ring, RequestRing: ring, ResponseRing: ring,
		MaxFrame: maxFrame, Daemon: "fake",
	}
	header := segmentHeader(ring, ring)
	sendMsg := func(msg any) func(net.Conn) {
		return func(conn net.Conn) {
			if _, err := readFrame(conn, maxFrame); err != nil { // attached
				return
			}
			frame, _ := appendFrame(nil, msg)
			conn.Write(frame)
		}
	}
	cases := []fakeWelcome{
		{name: "version", welcome: func(w *welcomeMsg) { w.Version = 1 }, want: ErrProtocol},
		{name: "three-semaphores", welcome: func(w *welcomeMsg) { w.Semaphores = w.Semaphores[:3] }, want: ErrProtocol},
		{name: "no-semaphores", welcome: func(w *welcomeMsg) { w.Semaphores = nil }, want: ErrProtocol},
		{name: "semaphore-path", welcome: func(w *welcomeMsg) { w.Semaphores = []string{"/a/b", "/c", "/d", "/e"} }, want: ErrProtocol},
		{name: "two-descriptors", fds: 2, want: ErrProtocol},
		{name: "size", size: func(n int64) int64 { return n + 4096 }, want: ErrProtocol},
		{name: "header", image: []byte("not a segment"), want: ErrProtocol},
		{name: "missing-semaphore", image: header, welcome: func(w *welcomeMsg) {
			w.Semaphores = append([]string{semBase + "-missing"}, w.Semaphores[1:]...)
		}, want: syscall.ENOENT},
		{name: "error-not-ready", image: header, want: ErrResource,
			after: sendMsg(&errorMsg{Type: "error", Code: CodeResource, Name: "RESOURCE", Message: "no", Fatal: true})},
		{name: "goodbye-not-ready", image: header, want: ErrShuttingDown,
			after: sendMsg(&goodbyeMsg{Type: "goodbye", Reason: "stopping"})},
		{name: "hang-up-not-ready", image: header, want: ErrClosed,
			after: func(conn net.Conn) { readFrame(conn, maxFrame); conn.Close() }},
	}

	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "fake.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func(t *testing.T, fw fakeWelcome) {
		t.Helper()
		w := good
		w.Semaphores = append([]string(nil), good.Semaphores...)
		if fw.welcome != nil {
			fw.welcome(&w)
		}
		served := make(chan struct{})
		go func() {
			defer close(served)
			serveFake(t, ln, fw, w)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := Dial(ctx, ln.Addr().String())
		if err == nil {
			c.Close()
			t.Fatalf("Dial succeeded")
		}
		if !errors.Is(err, fw.want) {
			t.Errorf("Dial: %v, want %v", err, fw.want)
		}
		<-served // the fake daemon closed its own copies
	}

	// Once first, so that whatever the runtime opens lazily (the poller, ...) is open
	// before counting.
	dial(t, cases[0])
	before := openFDs(t)
	for _, fw := range cases {
		t.Run(fw.name, func(t *testing.T) {
			dial(t, fw)
			if leaked := leakedSegments(openFDs(t), fw.name); len(leaked) > 0 {
				t.Errorf("segment descriptors left open: %v", leaked)
			}
		})
	}
	if after := openFDs(t); len(after) != len(before) {
		t.Errorf("%d descriptors open before the failed handshakes, %d after:\nbefore %v\nafter  %v", len(before), len(after), before, after)
	}
}
