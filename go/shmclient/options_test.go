package shmclient

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestDefaultName(t *testing.T) {
	long := strings.Repeat("é", 100) // 200 bytes: byte 128 is the middle of a character
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"no args", nil},
		{"empty argv[0]", []string{""}},
		{"ascii", []string{"/usr/bin/classify"}},
		{"long non-ascii", []string{"/opt/" + long}},
		{"long non-ascii, odd offset", []string{"/opt/x" + long}},
		{"four-byte runes", []string{strings.Repeat("😀", 40)}},
		{"not utf-8", []string{"/bin/caf\xe9"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := defaultName(tc.args)
			if got == "" || len(got) > maxClientName {
				t.Fatalf("name of %d bytes: %q", len(got), got)
			}
			if !utf8.ValidString(got) {
				t.Fatalf("name is not valid UTF-8 (the daemon refuses the handshake): %q", got)
			}
			if err := WithName(got)(&options{}); err != nil {
				t.Fatalf("WithName refuses the default name: %v", err)
			}
		})
	}
	// A cut keeps as many whole characters as fit.
	got := defaultName([]string{long})
	if want := strings.Repeat("é", maxClientName/2); got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	got = defaultName([]string{"x" + long})
	if want := "x" + strings.Repeat("é", (maxClientName-1)/2); got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	if got := defaultName([]string{"/usr/bin/classify"}); got != "classify (go shmclient)" {
		t.Fatalf("got %q", got)
	}
}

func TestWithNameRefusesInvalidUTF8(t *testing.T) {
	if err := WithName("caf\xe9")(&options{}); err == nil {
		t.Fatal("WithName accepted a name that is not UTF-8")
	}
	if err := WithName(strings.Repeat("a", maxClientName+1))(&options{}); err == nil {
		t.Fatal("WithName accepted a name over the limit")
	}
}
