package shmclient

import (
	"encoding/binary"
	"fmt"
	"io"
)

// appendFrame encodes msg canonically behind its u32 length prefix (SPEC §2.2).
func appendFrame(dst []byte, msg any) ([]byte, error) {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	dst, err := marshal(dst, msg)
	if err != nil {
		return dst[:start], err
	}
	n := len(dst) - start - 4
	if n > maxFrame {
		return dst[:start], fmt.Errorf("%w: control frame of %d bytes exceeds the %d byte limit", ErrTooLarge, n, maxFrame)
	}
	binary.LittleEndian.PutUint32(dst[start:], uint32(n))
	return dst, nil
}

// readFrame reads one frame body. The length is checked before anything is allocated,
// so a corrupt or hostile length cannot make the client allocate it.
func readFrame(r io.Reader, limit int) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint32(hdr[:])
	if n == 0 || uint64(n) > uint64(limit) {
		return nil, protocolErrorf("frame length %d outside 1..%d", n, limit)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return body, nil
}
