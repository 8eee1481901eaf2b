package shmclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestZeroDowntimeUpgrade: `tensord upgrade` replaces a daemon under load; callers with
// 1 s deadlines and default options lose nothing (issue 17 item 6). The new daemon loads
// its models first, then takes the socket over; the old one drains and exits.
func TestZeroDowntimeUpgrade(t *testing.T) {
	needDaemon(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "d.sock")
	d, err := startDaemonOn(dir, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer d.kill(syscall.SIGKILL)
	ctx := testCtx(t)
	c, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	var stop atomic.Bool
	var made, afterUpgrade atomic.Int64
	var upgraded atomic.Bool
	var mu sync.Mutex
	var failures []error
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				err := upgradeCall(ctx, c, w, i)
				made.Add(1)
				if upgraded.Load() {
					afterUpgrade.Add(1)
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, err)
					mu.Unlock()
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	out, err := exec.Command(pythonPath(), "-m", "tensord", "upgrade", "--socket", sock).CombinedOutput()
	if err != nil {
		stop.Store(true)
		wg.Wait()
		t.Fatalf("tensord upgrade: %v\n%s", err, out)
	}
	upgraded.Store(true)
	m := regexp.MustCompile(`new daemon \(pid (\d+)\)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("tensord upgrade said: %s", out)
	}
	newPID, _ := strconv.Atoi(string(m[1]))
	defer stopPID(newPID)
	select {
	case <-d.exited: // drained and gone
	case <-time.After(20 * time.Second):
		t.Error("the old daemon did not exit after the upgrade")
	}
	time.Sleep(300 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	t.Logf("%d calls, %d after the upgrade; %s", made.Load(), afterUpgrade.Load(), bytes.TrimSpace(out))
	for _, err := range failures {
		t.Errorf("call failed across the upgrade: %v", err)
	}
	if afterUpgrade.Load() == 0 {
		t.Fatal("no call was answered after the upgrade")
	}
}

// upgradeCall is one 1 s call with its own bytes: identity (checked byte for byte) or mlp.
func upgradeCall(ctx context.Context, c *Client, w, i int) error {
	cctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if i%2 == 0 {
		data := []int32{int32(w), int32(i), 7}
		out, err := c.Infer(cctx, "identity", FromInt32("x", []int64{3}, data))
		if err != nil {
			return err
		}
		if !bytes.Equal(out[0].Data, bytesOf(data)) {
			return fmt.Errorf("worker %d call %d: someone else's bytes", w, i)
		}
		return nil
	}
	out, err := c.Infer(cctx, "mlp", FromFloat32("x", []int64{1, 16}, make([]float32, 16)))
	if err == nil && len(out[0].Float32s()) != 4 {
		err = errors.New("mlp: wrong output")
	}
	return err
}

// stopPID ends a daemon this test did not start itself (the upgraded one).
func stopPID(pid int) {
	syscall.Kill(pid, syscall.SIGTERM)
	for range 200 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
}
