package main

import (
	"errors"
	"io"
	"net/http"
	"os"
	"sync/atomic"

	"google.golang.org/grpc/codes"
)

// Request bodies are read against one budget for the whole gateway: the memory they hold
// at once is bounded by a flag (-max-inflight), whatever clients announce or send. A body is
// read incrementally into a buffer that grows as bytes arrive (never sized from
// Content-Length, which a client may lie about), and every growth is taken from the budget
// first; a decompressed body grows the same buffer, so gzip counts its decompressed size.
// A body larger than -max-body is 413; a body the budget cannot take now is 429 (retry);
// a body that does not arrive within -body-timeout is 408.

// budget is a count of bytes that may be held; try takes n or nothing.
type budget struct {
	limit int64
	used  atomic.Int64
}

func (b *budget) try(n int64) bool {
	if b == nil {
		return true
	}
	if b.used.Add(n) > b.limit {
		b.used.Add(-n)
		return false
	}
	return true
}

func (b *budget) give(n int64) {
	if b != nil && n > 0 {
		b.used.Add(-n)
	}
}

// body is a request body read into memory, holding its share of the budget until free.
type body struct {
	buf  []byte
	held int64
	b    *budget
}

func (bd *body) free() {
	bd.b.give(bd.held)
	bd.buf, bd.held = nil, 0
}

// readChunk is the first allocation and the smallest step of growth.
const readChunk = 64 << 10

var (
	errBudget = &requestError{http.StatusTooManyRequests, codes.ResourceExhausted,
		"tensord-gateway: too many request bytes in flight (-max-inflight); retry shortly"}
	errBodyTimeout = &requestError{http.StatusRequestTimeout, codes.DeadlineExceeded,
		"tensord-gateway: the request body did not arrive in time (-body-timeout)"}
)

// readBody reads r to its end into memory taken from b, refusing more than limit bytes.
func readBody(r io.Reader, limit int64, b *budget) (*body, error) {
	bd := &body{b: b}
	for {
		if len(bd.buf) == cap(bd.buf) {
			if int64(len(bd.buf)) > limit {
				bd.free()
				return nil, tooLarge("request body larger than %d bytes (-max-body)", limit)
			}
			old := int64(cap(bd.buf))
			grow := max(old, readChunk)
			grow = min(grow, limit+1-old) // one byte past limit tells "too large"
			// While the bytes are copied both buffers are alive: the budget holds both.
			if !b.try(old + grow) {
				bd.free()
				return nil, errBudget
			}
			nb := make([]byte, len(bd.buf), old+grow)
			copy(nb, bd.buf)
			bd.buf = nb
			b.give(old) // the old buffer is garbage now
			bd.held = old + grow
		}
		n, err := r.Read(bd.buf[len(bd.buf):cap(bd.buf)])
		bd.buf = bd.buf[:len(bd.buf)+n]
		if errors.Is(err, io.EOF) {
			if int64(len(bd.buf)) > limit {
				bd.free()
				return nil, tooLarge("request body larger than %d bytes (-max-body)", limit)
			}
			return bd, nil
		}
		if err != nil {
			bd.free()
			var mb *http.MaxBytesError
			switch {
			case errors.As(err, &mb):
				return nil, tooLarge("request body larger than %d bytes (-max-body)", limit)
			case errors.Is(err, os.ErrDeadlineExceeded):
				return nil, errBodyTimeout
			}
			return nil, badRequest("reading the request body: %v", err)
		}
	}
}

// sizeHint says why a Content-Length is refused before a byte is read, or nil.
func sizeHint(contentLength, limit int64) error {
	if contentLength > limit {
		return tooLarge("request body of %d bytes (Content-Length) is larger than %d (-max-body)", contentLength, limit)
	}
	return nil
}
