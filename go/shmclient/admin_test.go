package shmclient

import (
	"errors"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestLoadReloadUnload(t *testing.T) {
	needDaemon(t)
	ctx := testCtx(t)
	path := filepath.Join(t.TempDir(), "mlp.pt")
	out, err := exec.Command(pythonPath(), "-c",
		"import sys; from tensord.models.builtin import build_mlp; build_mlp().save(sys.argv[1])", path).CombinedOutput()
	if err != nil {
		t.Fatalf("saving a TorchScript model: %v\n%s", err, out)
	}
	c := dialTest(t)
	sig := map[string]any{
		"source": "torchscript", "path": path, "device": "cpu",
		"inputs":  []map[string]any{{"name": "x", "dtype": "f32", "shape": []int{-1, 16}}},
		"outputs": []map[string]any{{"name": "y", "dtype": "f32", "shape": []int{-1, 4}}},
	}
	if err := c.Load(ctx, "mlp-admin", sig); err != nil {
		t.Fatal(err)
	}
	// Versions keep counting across unload and load in one daemon (which other runs of
	// this test, -count, share): expect them relative to the first.
	version := func() uint64 {
		t.Helper()
		models, err := c.Models(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range models {
			if m.Name == "mlp-admin" {
				return m.Version
			}
		}
		t.Fatal("mlp-admin is not listed")
		return 0
	}
	loaded := version()
	t.Cleanup(func() { c.Unload(ctx, "mlp-admin") }) // for a run that fails half-way
	xs := make([]float32, 32)
	for i := range xs {
		xs[i] = float32(i%16)/8 - float32(i/16)
	}
	x := FromFloat32("x", []int64{2, 16}, xs)
	// Against the reference, not bit for bit against mlp's answer (see checkClose).
	got, err := c.Infer(ctx, "mlp-admin", x)
	if err != nil {
		t.Fatal(err)
	}
	checkClose(t, "loaded copy of mlp", got[0].Float32s(), mlpReference(t, xs))
	if err := c.Reload(ctx, "mlp-admin"); err != nil {
		t.Fatal(err)
	}
	if v := version(); v != loaded+1 {
		t.Fatalf("after a reload the version is %d, want %d", v, loaded+1)
	}
	if err := c.Load(ctx, "mlp-admin", sig); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("loading a name twice: %v, want ErrBadRequest", err)
	}
	if err := c.Unload(ctx, "mlp-admin"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Infer(ctx, "mlp-admin", x); !errors.Is(err, ErrUnknownModel) {
		t.Fatalf("after unload: %v, want ErrUnknownModel", err)
	}
	if err := c.Reload(ctx, "mlp"); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("reloading a built-in model: %v, want ErrUnsupported", err)
	}
	bad := map[string]any{"source": "torchscript", "path": filepath.Join(t.TempDir(), "missing.pt"),
		"inputs": sig["inputs"], "outputs": sig["outputs"]}
	if err := c.Load(ctx, "broken", bad); !errors.Is(err, ErrModelFailed) {
		t.Fatalf("loading a missing file: %v, want ErrModelFailed", err)
	}
}
