package shmclient

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"syscall"
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

// maxFDs is how many descriptors readFrameFDs makes room for: more than the welcome's five,
// so that a welcome with too many is reported with its real count.
const maxFDs = 16

// readFrameFDs reads one frame from a Unix socket together with the file descriptors sent
// with its first byte (SCM_RIGHTS): the welcome carries the session's segment and
// eventfds. The caller owns the descriptors, also when an error is returned with them.
func readFrameFDs(conn *net.UnixConn, limit int) ([]byte, []int, error) {
	var hdr [4]byte
	oob := make([]byte, syscall.CmsgSpace(maxFDs*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(hdr[:], oob)
	// Descriptors that arrived are installed in this process whatever else went wrong:
	// collect them first so that the caller can close them.
	var fds []int
	if oobn > 0 {
		msgs, perr := syscall.ParseSocketControlMessage(oob[:oobn])
		if perr != nil && err == nil {
			err = protocolErrorf("bad ancillary data on the welcome: %v", perr)
		}
		for i := range msgs {
			if got, err := syscall.ParseUnixRights(&msgs[i]); err == nil {
				fds = append(fds, got...)
			}
		}
	}
	if err != nil {
		return nil, fds, err
	}
	if flags&syscall.MSG_CTRUNC != 0 {
		// The kernel closed the descriptors that did not fit.
		return nil, fds, protocolErrorf("the welcome came with more than %d file descriptors", maxFDs)
	}
	if n == 0 {
		return nil, fds, io.EOF
	}
	if n < len(hdr) {
		if _, err := io.ReadFull(conn, hdr[n:]); err != nil {
			return nil, fds, err
		}
	}
	size := binary.LittleEndian.Uint32(hdr[:])
	if size == 0 || uint64(size) > uint64(limit) {
		return nil, fds, protocolErrorf("frame length %d outside 1..%d", size, limit)
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(conn, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fds, err
	}
	return body, fds, nil
}
