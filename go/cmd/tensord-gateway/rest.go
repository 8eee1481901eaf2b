package main

import (
	"compress/gzip"
	"compress/zlib"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/tensord/tensord/go/shmclient"
	"google.golang.org/grpc/codes"
)

// The Open Inference Protocol over HTTP/REST (KServe v2), with Triton's binary tensor
// extension: a request or response body may be a JSON header of
// Inference-Header-Content-Length bytes followed by raw tensor bytes, each tensor's share
// named by its "binary_data_size" parameter, in order.

const headerLength = "Inference-Header-Content-Length"

// routes is the HTTP API. Every answer is the protocol's JSON, a route that does not exist
// (404) or a method a route does not take (405) included: Triton's clients parse every body.
func (g *gateway) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v2", g.serverMetadata)
	mux.HandleFunc("GET /v2/health/live", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	mux.HandleFunc("GET /v2/health/ready", func(w http.ResponseWriter, _ *http.Request) {
		if g.ready() {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	mux.HandleFunc("GET /v2/models/{name}", g.modelMetadata)
	mux.HandleFunc("GET /v2/models/{name}/versions/{version}", g.modelMetadata)
	mux.HandleFunc("GET /v2/models/{name}/ready", g.modelReady)
	mux.HandleFunc("GET /v2/models/{name}/versions/{version}/ready", g.modelReady)
	mux.HandleFunc("POST /v2/models/{name}/infer", g.restInfer)
	mux.HandleFunc("POST /v2/models/{name}/versions/{version}/infer", g.restInfer)
	mux.HandleFunc("POST /v2/repository/index", g.repositoryIndex)
	mux.HandleFunc("GET /v2/models/{name}/config", g.modelConfig)
	mux.HandleFunc("GET /v2/models/{name}/versions/{version}/config", g.modelConfig)
	mux.HandleFunc("GET /v2/models/stats", g.modelStats)
	mux.HandleFunc("GET /v2/models/{name}/stats", g.modelStats)
	mux.HandleFunc("GET /v2/models/{name}/versions/{version}/stats", g.modelStats)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern == "" {
			// The mux's own 404 and 405 are plain text; answer them in JSON.
			mux.ServeHTTP(&jsonStatus{ResponseWriter: w, path: r.URL.Path, method: r.Method}, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// jsonStatus replaces the body of the mux's own error answers with the protocol's JSON.
type jsonStatus struct {
	http.ResponseWriter
	path, method string
	wrote        bool
}

func (j *jsonStatus) WriteHeader(status int) {
	if status < 400 {
		j.ResponseWriter.WriteHeader(status)
		return
	}
	j.wrote = true
	msg := "tensord-gateway: no route " + j.path + " (the Open Inference Protocol's are under /v2)"
	if status == http.StatusMethodNotAllowed {
		msg = "tensord-gateway: " + j.path + " does not take " + j.method
	}
	writeError(j.ResponseWriter, &requestError{status, codes.Unimplemented, msg})
}

func (j *jsonStatus) Write(b []byte) (int, error) {
	if j.wrote {
		return len(b), nil // the mux's text, replaced
	}
	return j.ResponseWriter.Write(b)
}

type serverMetadataJSON struct {
	Name       string   `json:"name"`
	Version    string   `json:"version"`
	Extensions []string `json:"extensions"`
}

const gatewayVersion = "0.1.0"

func (g *gateway) serverMetadata(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, serverMetadataJSON{"tensord-gateway", gatewayVersion, []string{"binary_tensor_data"}})
}

type tensorMetadataJSON struct {
	Name       string            `json:"name"`
	Datatype   string            `json:"datatype"`
	Shape      []int64           `json:"shape"`
	Parameters map[string]string `json:"parameters,omitempty"`
}

type limitsJSON struct {
	MaxBatch  uint64   `json:"max_batch"`
	MaxBytes  uint64   `json:"max_bytes"`
	MaxPixels uint64   `json:"max_pixels"`
	MaxTokens uint64   `json:"max_tokens"`
	Formats   []string `json:"formats"`
}

type modelParamsJSON struct {
	Device string     `json:"device"`
	Limits limitsJSON `json:"limits"`
}

type modelMetadataJSON struct {
	Name       string               `json:"name"`
	Versions   []string             `json:"versions"`
	Platform   string               `json:"platform"`
	Inputs     []tensorMetadataJSON `json:"inputs"`
	Outputs    []tensorMetadataJSON `json:"outputs"`
	Parameters modelParamsJSON      `json:"parameters"`
}

func tensorsMetadata(specs []shmclient.TensorSpec) []tensorMetadataJSON {
	out := make([]tensorMetadataJSON, len(specs))
	for i, s := range specs {
		shape := s.Shape
		if shape == nil {
			shape = []int64{-1} // any rank: the protocol has no way to say it
		}
		out[i] = tensorMetadataJSON{Name: s.Name, Datatype: datatypeName(s.DType), Shape: shape}
		if s.Meaning != "" {
			out[i].Parameters = map[string]string{"meaning": s.Meaning}
		}
	}
	return out
}

func (g *gateway) modelMetadata(w http.ResponseWriter, r *http.Request) {
	m, err := g.model(r.Context(), r.PathValue("name"), r.PathValue("version"))
	if err != nil {
		writeError(w, err)
		return
	}
	formats := m.Limits.Formats
	if formats == nil {
		formats = []string{}
	}
	writeJSON(w, http.StatusOK, modelMetadataJSON{
		Name: m.Name, Versions: []string{strconv.FormatUint(m.Version, 10)}, Platform: platform(m),
		Inputs: tensorsMetadata(m.Inputs), Outputs: tensorsMetadata(m.Outputs),
		Parameters: modelParamsJSON{Device: m.Device, Limits: limitsJSON{m.Limits.MaxBatch,
			m.Limits.MaxBytes, m.Limits.MaxPixels, m.Limits.MaxTokens, formats}},
	})
}

func (g *gateway) modelReady(w http.ResponseWriter, r *http.Request) {
	if _, err := g.model(r.Context(), r.PathValue("name"), r.PathValue("version")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

type indexEntryJSON struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	State   string `json:"state"`
}

func (g *gateway) repositoryIndex(w http.ResponseWriter, r *http.Request) {
	if !g.ready() {
		writeError(w, errNotReady)
		return
	}
	models, err := g.b.Models(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	out := make([]indexEntryJSON, len(models))
	for i, m := range models {
		out[i] = indexEntryJSON{m.Name, strconv.FormatUint(m.Version, 10), "READY"}
	}
	writeJSON(w, http.StatusOK, out)
}

// ---- infer ----------------------------------------------------------------------------

type restRequest struct {
	ID         string           `json:"id"`
	Parameters restParams       `json:"parameters"`
	Inputs     []restInput      `json:"inputs"`
	Outputs    []restOutputSpec `json:"outputs"`
}

// restParams are the request and tensor parameters the gateway acts on; others are
// accepted and ignored, as the protocol allows.
type restParams struct {
	BinaryDataSize   *int64 `json:"binary_data_size"`
	BinaryData       *bool  `json:"binary_data"`
	BinaryDataOutput *bool  `json:"binary_data_output"`
	Timeout          *int64 `json:"timeout"`
	Classification   *int64 `json:"classification"`
}

type restInput struct {
	Name       string          `json:"name"`
	Shape      []int64         `json:"shape"`
	Datatype   string          `json:"datatype"`
	Parameters restParams      `json:"parameters"`
	Data       json.RawMessage `json:"data"`
}

type restOutputSpec struct {
	Name       string     `json:"name"`
	Parameters restParams `json:"parameters"`
}

// scratch is a request's reusable memory for the response built out. (Bodies are read
// into memory taken from the gateway's budget, body.go, and are not pooled.)
type scratch struct {
	out []byte
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

func (g *gateway) restInfer(w http.ResponseWriter, r *http.Request) {
	s := scratchPool.Get().(*scratch)
	defer func() {
		if cap(s.out) <= 1<<20 { // keep no large buffers around, outside every budget
			scratchPool.Put(s)
		}
	}()
	if g.bodyTimeout > 0 {
		// The whole body within -body-timeout: a body that trickles in holds a connection,
		// a goroutine and its buffer, so it is cut off.
		http.NewResponseController(w).SetReadDeadline(time.Now().Add(g.bodyTimeout))
	}
	req, binaryOut, bd, err := g.readRESTRequest(w, r)
	if err != nil {
		writeError(w, err)
		return
	}
	defer bd.free() // the inputs alias the body until the response is written
	res, err := g.infer(r.Context(), req)
	if err != nil {
		writeError(w, err)
		return
	}
	// The response is built while the outputs are still views of shared memory, then they
	// are released before a byte goes to the network: a slow reader never holds the ring.
	out, n, err := encodeRESTResponse(s.out[:0], req, res, binaryOut)
	res.release()
	s.out = out
	if err != nil {
		writeError(w, err)
		return
	}
	h := w.Header()
	if n >= 0 {
		h.Set(headerLength, strconv.Itoa(n))
		h.Set("Content-Type", "application/octet-stream")
	} else {
		h.Set("Content-Type", "application/json")
	}
	h.Set("Content-Length", strconv.Itoa(len(out)))
	w.WriteHeader(http.StatusOK)
	w.Write(out)
}

// readRESTRequest reads and parses an infer request. The inputs alias the body, whose
// memory the caller frees (body.free) once they are no longer used.
func (g *gateway) readRESTRequest(w http.ResponseWriter, r *http.Request) (_ *inferRequest, _ bool, bd *body, err error) {
	if err := sizeHint(r.ContentLength, g.maxBody); err != nil {
		return nil, false, nil, err
	}
	var src io.Reader = http.MaxBytesReader(w, r.Body, g.maxBody)
	switch enc := r.Header.Get("Content-Encoding"); enc {
	case "", "identity":
	case "gzip":
		zr, err := gzip.NewReader(src)
		if err != nil {
			return nil, false, nil, compressedErr("gzip", err)
		}
		src = zr
	case "deflate":
		zr, err := zlib.NewReader(src)
		if err != nil {
			return nil, false, nil, compressedErr("deflate", err)
		}
		src = zr
	default:
		return nil, false, nil, &requestError{http.StatusUnsupportedMediaType, 0, "Content-Encoding " + enc + " is not supported (gzip, deflate)"}
	}
	// Decompressed bytes are what the buffer holds: they count against -max-body and the
	// budget, so a small compressed body cannot expand without bound.
	if bd, err = readBody(src, g.maxBody, g.inflight); err != nil {
		return nil, false, nil, err
	}
	defer func() {
		if err != nil {
			bd.free()
		}
	}()
	req, binaryOut, err := parseRESTRequest(r, bd.buf)
	return req, binaryOut, bd, err
}

// compressedErr words a failure to start decompressing: the body's deadline, or bad data.
func compressedErr(enc string, err error) error {
	var mb *http.MaxBytesError
	switch {
	case errors.As(err, &mb):
		return tooLarge("request body larger than the limit (-max-body)")
	case errors.Is(err, os.ErrDeadlineExceeded):
		return errBodyTimeout
	}
	return badRequest("Content-Encoding %s: %v", enc, err)
}

// parseRESTRequest parses an infer request's body (JSON, or JSON then binary tensors).
func parseRESTRequest(r *http.Request, all []byte) (*inferRequest, bool, error) {
	header, rest := all, []byte(nil)
	if v := r.Header.Get(headerLength); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > len(all) {
			return nil, false, badRequest("%s: %q is not a length within the %d-byte body", headerLength, v, len(all))
		}
		header, rest = all[:n], all[n:]
	}
	var rr restRequest
	if err := json.Unmarshal(header, &rr); err != nil {
		return nil, false, badRequest("the request is not a valid inference request (JSON): %v", err)
	}
	if rr.Parameters.Classification != nil {
		return nil, false, badRequest("the classification extension is not supported: vision.classify and text.classify models return labels and scores themselves")
	}
	req := &inferRequest{model: r.PathValue("name"), version: r.PathValue("version"), id: rr.ID}
	if t := rr.Parameters.Timeout; t != nil {
		d, err := timeoutParam(*t)
		if err != nil {
			return nil, false, err
		}
		req.timeout = d
	}
	if len(rr.Inputs) == 0 {
		return nil, false, badRequest("the request has no inputs")
	}
	for _, in := range rr.Inputs {
		t, err := restTensor(in, &rest)
		if err != nil {
			return nil, false, err
		}
		req.inputs = append(req.inputs, t)
	}
	if len(rest) != 0 {
		return nil, false, badRequest("%d bytes of binary data left over after the inputs' binary_data_size", len(rest))
	}
	for _, o := range rr.Outputs {
		ro := requestedOutput{name: o.Name}
		if o.Parameters.Classification != nil {
			return nil, false, badRequest("output %q: the classification extension is not supported", o.Name)
		}
		if b := o.Parameters.BinaryData; b != nil {
			ro.binary = -1
			if *b {
				ro.binary = 1
			}
		}
		req.outputs = append(req.outputs, ro)
	}
	binaryOut := rr.Parameters.BinaryDataOutput != nil && *rr.Parameters.BinaryDataOutput
	return req, binaryOut, nil
}

// restTensor turns one input into a tensor: its binary_data_size bytes from the front of
// *rest, or its JSON data.
func restTensor(in restInput, rest *[]byte) (shmclient.Tensor, error) {
	if in.Name == "" {
		return shmclient.Tensor{}, badRequest("an input has no name")
	}
	d, err := parseDatatype(in.Name, in.Datatype)
	if err != nil {
		return shmclient.Tensor{}, err
	}
	if in.Shape == nil {
		return shmclient.Tensor{}, badRequest("input %q has no shape", in.Name)
	}
	n, err := numElements(in.Name, in.Shape)
	if err != nil {
		return shmclient.Tensor{}, err
	}
	t := shmclient.Tensor{Name: in.Name, DType: d, Shape: in.Shape}
	if size := in.Parameters.BinaryDataSize; size != nil {
		if *size < 0 || *size > int64(len(*rest)) {
			return t, badRequest("input %q: binary_data_size %d, but %d bytes of binary data are left", in.Name, *size, len(*rest))
		}
		raw := (*rest)[:*size]
		*rest = (*rest)[*size:]
		if d == shmclient.Bytes {
			t.Data, err = bytesFromPrefixed(nil, raw, n, in.Name)
			return t, err
		}
		t.Data = raw
		return t, checkNumeric(in.Name, d, n, raw)
	}
	if len(in.Data) == 0 {
		return t, badRequest("input %q has neither data nor a binary_data_size parameter", in.Name)
	}
	t.Data, err = decodeJSONData(in.Data, d, n, in.Name)
	return t, err
}

// encodeRESTResponse appends the response body to b. n is the JSON header's length when any
// output is binary, else -1.
func encodeRESTResponse(b []byte, req *inferRequest, res *inferResult, binaryDefault bool) (out []byte, n int, err error) {
	b = append(b, `{"model_name":`...)
	b = appendJSONString(b, []byte(req.model))
	b = append(b, `,"model_version":`...)
	b = appendJSONString(b, []byte(res.version))
	if req.id != "" {
		b = append(b, `,"id":`...)
		b = appendJSONString(b, []byte(req.id))
	}
	b = append(b, `,"outputs":[`...)
	binary := make([]bool, len(res.outputs))
	anyBinary := false
	for i, t := range res.outputs {
		binary[i] = res.binary[i] > 0 || (res.binary[i] == 0 && binaryDefault)
		anyBinary = anyBinary || binary[i]
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"name":`...)
		b = appendJSONString(b, []byte(t.Name))
		b = append(b, `,"datatype":"`...)
		b = append(b, datatypeName(t.DType)...)
		b = append(b, `","shape":[`...)
		for j, d := range t.Shape {
			if j > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, d, 10)
		}
		b = append(b, ']')
		if binary[i] {
			b = append(b, `,"parameters":{"binary_data_size":`...)
			b = strconv.AppendInt(b, int64(len(t.Data)), 10)
			b = append(b, '}')
		} else {
			b = append(b, `,"data":`...)
			if b, err = appendJSONData(b, t); err != nil {
				return nil, 0, err
			}
		}
		b = append(b, '}')
	}
	b = append(b, "]}"...)
	if !anyBinary {
		return b, -1, nil
	}
	n = len(b)
	for i, t := range res.outputs {
		if !binary[i] {
			continue
		}
		if t.DType == shmclient.Bytes {
			if b, err = appendPrefixed(b, t); err != nil {
				return nil, 0, err
			}
		} else {
			b = append(b, t.Data...)
		}
	}
	return b, n, nil
}

// ---- helpers ----------------------------------------------------------------------------

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(b)
}

// writeError answers with the protocol's error object: {"error": "<message>"}.
func writeError(w http.ResponseWriter, err error) {
	status, _ := errorStatus(err)
	b := append([]byte(`{"error":`), appendJSONString(nil, []byte(err.Error()))...)
	b = append(b, '}')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}
