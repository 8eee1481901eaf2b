package main

import (
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"

	"github.com/tensord/tensord/go/shmclient"
)

// The Open Inference Protocol over HTTP/REST (KServe v2), with Triton's binary tensor
// extension: a request or response body may be a JSON header of
// Inference-Header-Content-Length bytes followed by raw tensor bytes, each tensor's share
// named by its "binary_data_size" parameter, in order.

const headerLength = "Inference-Header-Content-Length"

func (g *gateway) routes() *http.ServeMux {
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
	return mux
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

// scratch is a request's reusable memory: the body read in, the response built out.
type scratch struct {
	in  bytes.Buffer
	out []byte
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

func (g *gateway) restInfer(w http.ResponseWriter, r *http.Request) {
	s := scratchPool.Get().(*scratch)
	s.in.Reset()
	defer func() {
		if s.in.Cap() <= 64<<20 && cap(s.out) <= 64<<20 { // keep no giant buffers around
			scratchPool.Put(s)
		}
	}()
	req, binaryOut, err := g.readRESTRequest(w, r, &s.in)
	if err != nil {
		writeError(w, err)
		return
	}
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

// readRESTRequest reads and parses an infer request; body is scratch space it may keep
// input data in.
func (g *gateway) readRESTRequest(w http.ResponseWriter, r *http.Request, body *bytes.Buffer) (*inferRequest, bool, error) {
	var src io.Reader = http.MaxBytesReader(w, r.Body, g.maxBody)
	switch enc := r.Header.Get("Content-Encoding"); enc {
	case "", "identity":
	case "gzip":
		zr, err := gzip.NewReader(src)
		if err != nil {
			return nil, false, badRequest("Content-Encoding gzip: %v", err)
		}
		src = io.LimitReader(zr, g.maxBody+1)
	case "deflate":
		zr, err := zlib.NewReader(src)
		if err != nil {
			return nil, false, badRequest("Content-Encoding deflate: %v", err)
		}
		src = io.LimitReader(zr, g.maxBody+1)
	default:
		return nil, false, &requestError{http.StatusUnsupportedMediaType, 0, "Content-Encoding " + enc + " is not supported (gzip, deflate)"}
	}
	if r.ContentLength > 0 && r.ContentLength <= g.maxBody {
		body.Grow(int(r.ContentLength))
	}
	if _, err := body.ReadFrom(src); err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			return nil, false, tooLarge("request body larger than %d bytes (-max-body)", g.maxBody)
		}
		return nil, false, badRequest("reading the request body: %v", err)
	}
	if int64(body.Len()) > g.maxBody {
		return nil, false, tooLarge("request body larger than %d bytes (-max-body)", g.maxBody)
	}
	all := body.Bytes()
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
