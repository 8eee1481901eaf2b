package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// msgpackTransport dials one Unix-socket connection per caller: the protocol has no
// request ids, so a connection carries one request at a time (like tensord's session
// thread, the server runs one thread per connection).
type msgpackTransport struct {
	addr string
}

func openMsgpack(_ context.Context, cfg Config) (Transport, error) {
	return &msgpackTransport{addr: cfg.Addr}, nil
}

func (t *msgpackTransport) Close() error { return nil }

func (t *msgpackTransport) NewCaller() (Caller, error) {
	conn, err := net.DialTimeout("unix", t.addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &msgpackCaller{conn: conn}, nil
}

type mpTensor struct {
	Name  string  `msgpack:"name"`
	DType string  `msgpack:"dtype"`
	Shape []int64 `msgpack:"shape"`
	Data  []byte  `msgpack:"data"`
}

type mpRequest struct {
	Model  string     `msgpack:"model"`
	Inputs []mpTensor `msgpack:"inputs"`
}

type mpResponse struct {
	Outputs []mpTensor `msgpack:"outputs"`
	Error   string     `msgpack:"error"`
}

type msgpackCaller struct {
	conn net.Conn
	out  bytes.Buffer
	enc  *msgpack.Encoder
	in   []byte
}

func (c *msgpackCaller) Close() error { return c.conn.Close() }

func (c *msgpackCaller) Call(ctx context.Context, p *Payload) error {
	if err := p.needF32(Msgpack); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	}
	// Encode after a 4-byte hole for the length: the tensor is copied once, into the frame.
	c.out.Reset()
	c.out.Write([]byte{0, 0, 0, 0})
	if c.enc == nil {
		c.enc = msgpack.NewEncoder(&c.out)
	}
	if err := c.enc.Encode(&mpRequest{Model: p.Model, Inputs: []mpTensor{{Name: "x", DType: "f32", Shape: p.Shape, Data: p.Data}}}); err != nil {
		return err
	}
	frame := c.out.Bytes()
	binary.LittleEndian.PutUint32(frame, uint32(len(frame)-4))
	if _, err := c.conn.Write(frame); err != nil {
		return err
	}
	var head [4]byte
	if _, err := io.ReadFull(c.conn, head[:]); err != nil {
		return err
	}
	n := int(binary.LittleEndian.Uint32(head[:]))
	if cap(c.in) < n {
		c.in = make([]byte, n)
	}
	c.in = c.in[:n]
	if _, err := io.ReadFull(c.conn, c.in); err != nil {
		return err
	}
	var resp mpResponse
	if err := msgpack.Unmarshal(c.in, &resp); err != nil {
		return err
	}
	if resp.Error != "" {
		return fmt.Errorf("server: %s", resp.Error)
	}
	if len(resp.Outputs) != 1 {
		return fmt.Errorf("%d outputs, want 1", len(resp.Outputs))
	}
	return p.CheckBytes(resp.Outputs[0].Shape, resp.Outputs[0].Data)
}
