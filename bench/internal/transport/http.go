package transport

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// httpTransport is a net/http client with a keep-alive pool of one connection per caller,
// posting KServe-v2-style JSON to the Flask app under gunicorn.
type httpTransport struct {
	client *http.Client
	url    string
}

func openHTTP(_ context.Context, cfg Config) (Transport, error) {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        cfg.Callers,
		MaxIdleConnsPerHost: cfg.Callers,
		IdleConnTimeout:     60 * time.Second,
		DisableCompression:  true,
	}
	return &httpTransport{client: &http.Client{Transport: tr}, url: "http://" + cfg.Addr + "/v2/models/"}, nil
}

func (t *httpTransport) NewCaller() (Caller, error) { return &httpCaller{t: t}, nil }

func (t *httpTransport) Close() error {
	t.client.CloseIdleConnections()
	return nil
}

type jsonTensor struct {
	Name     string    `json:"name"`
	Datatype string    `json:"datatype"`
	Shape    []int64   `json:"shape"`
	Data     []float32 `json:"data"`
}

type jsonRequest struct {
	Inputs []jsonTensor `json:"inputs"`
}

type jsonResponse struct {
	Outputs []jsonTensor `json:"outputs"`
	Error   string       `json:"error"`
}

type httpCaller struct {
	t   *httpTransport
	buf bytes.Buffer
}

func (c *httpCaller) Close() error { return nil }

func (c *httpCaller) Call(ctx context.Context, p *Payload) error {
	if err := p.needF32(HTTPJSON); err != nil {
		return err
	}
	c.buf.Reset()
	err := json.NewEncoder(&c.buf).Encode(jsonRequest{Inputs: []jsonTensor{{Name: "x", Datatype: "f32", Shape: p.Shape, Data: p.Floats}}})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.t.url+p.Model+"/infer", bytes.NewReader(c.buf.Bytes()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.t.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var out jsonResponse
	err = json.NewDecoder(resp.Body).Decode(&out)
	// Drain so the connection goes back to the keep-alive pool.
	_, _ = io.Copy(io.Discard, resp.Body)
	if err != nil {
		return fmt.Errorf("HTTP %d: decoding the response: %w", resp.StatusCode, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, out.Error)
	}
	if len(out.Outputs) != 1 {
		return fmt.Errorf("%d outputs, want 1", len(out.Outputs))
	}
	return p.CheckFloats(out.Outputs[0].Shape, out.Outputs[0].Data)
}
