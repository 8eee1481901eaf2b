package shmclient

// Control messages (SPEC §2.4): the wire structs. The descriptors in ring records (SPEC
// §4.4) are in desc.go; the codec (one, hand-written) is encode.go and decode.go.
//
// Wire structs mirror SPEC §2.4 and §4.4 field for field. The encoder writes struct fields
// in declaration order, so the declaration order below IS the canonical key order of SPEC
// §2.3; do not reorder fields. Only keys the SPEC calls optional carry omitempty.

// protocolVersion 5: model info says whether a model is idempotent, and errors name the
// input, item and limit they are about. (Version 4: model info carries kind, limits and each
// tensor's meaning.) The client also speaks minProtocolVersion, whose daemons send neither.
const (
	protocolVersion    = 5
	minProtocolVersion = 4
)

// Limits of SPEC §7 that the client checks before sending.
const (
	maxFrame      = 1 << 20
	maxDescriptor = 65536
	maxTensors    = 64
	maxRank       = 16
	maxNameLen    = 256
	minRing       = 65536
)

type helloMsg struct {
	Type         string `msgpack:"type"`
	MinVersion   uint64 `msgpack:"min_version"`
	MaxVersion   uint64 `msgpack:"max_version"`
	Client       string `msgpack:"client"`
	RequestRing  uint64 `msgpack:"request_ring"`
	ResponseRing uint64 `msgpack:"response_ring"`
	// ControlOnly asks for a connection without a session (SPEC §2.4). This client always
	// opens a session and never sets it; the field is here for the golden vectors.
	ControlOnly bool `msgpack:"control_only,omitempty"`
}

type welcomeMsg struct {
	Type         string `msgpack:"type"`
	Version      uint64 `msgpack:"version"`
	Session      string `msgpack:"session"`
	SegmentSize  uint64 `msgpack:"segment_size"`
	RequestRing  uint64 `msgpack:"request_ring"`
	ResponseRing uint64 `msgpack:"response_ring"`
	MaxFrame     uint64 `msgpack:"max_frame"`
	Daemon       string `msgpack:"daemon"`
}

// typeOnlyMsg covers attached and ready.
type typeOnlyMsg struct {
	Type string `msgpack:"type"`
}

// idMsg covers models, ping, pong and ok.
type idMsg struct {
	Type string `msgpack:"type"`
	ID   uint64 `msgpack:"id"`
}

type wireSpec struct {
	Name    string  `msgpack:"name"`
	DType   string  `msgpack:"dtype"`
	Shape   []int64 `msgpack:"shape"` // nil = any rank; must stay without omitempty
	Meaning string  `msgpack:"meaning"`
}

type wireLimits struct {
	MaxBatch  uint64   `msgpack:"max_batch"`
	MaxBytes  uint64   `msgpack:"max_bytes"`
	MaxPixels uint64   `msgpack:"max_pixels"`
	MaxTokens uint64   `msgpack:"max_tokens"`
	Formats   []string `msgpack:"formats"`
}

type wireModel struct {
	Name    string     `msgpack:"name"`
	Version uint64     `msgpack:"version"`
	Device  string     `msgpack:"device"`
	Inputs  []wireSpec `msgpack:"inputs"`
	Outputs []wireSpec `msgpack:"outputs"`
	Kind    string     `msgpack:"kind"`
	Limits  wireLimits `msgpack:"limits"`
	// Version 5; absent from a version 4 daemon (a pointer: false is written, nil is not).
	Idempotent *bool `msgpack:"idempotent,omitempty"`
}

type modelListMsg struct {
	Type   string      `msgpack:"type"`
	ID     uint64      `msgpack:"id"`
	Models []wireModel `msgpack:"models"`
}

type loadMsg struct {
	Type   string `msgpack:"type"`
	ID     uint64 `msgpack:"id"`
	Name   string `msgpack:"name"`
	Config mpMap  `msgpack:"config"`
}

// nameMsg covers unload and reload.
type nameMsg struct {
	Type string `msgpack:"type"`
	ID   uint64 `msgpack:"id"`
	Name string `msgpack:"name"`
}

type errorMsg struct {
	Type    string `msgpack:"type"`
	ID      uint64 `msgpack:"id"`
	Code    uint64 `msgpack:"code"`
	Name    string `msgpack:"name"`
	Message string `msgpack:"message"`
	Fatal   bool   `msgpack:"fatal"`
	// Version 5, written only when known (SPEC §6 "Error fields"): pointers, since item 0
	// and limit 0 are values.
	Input string  `msgpack:"input,omitempty"`
	Item  *uint64 `msgpack:"item,omitempty"`
	Limit *uint64 `msgpack:"limit,omitempty"`
}

// daemonError builds the error a wire error stands for.
func daemonError(code uint64, name, message string, fatal bool, input string, item, limit *uint64) *DaemonError {
	e := &DaemonError{Code: code, Name: name, Message: message, Fatal: fatal, Input: input, Item: -1}
	if item != nil && *item <= uint64(maxInt) {
		e.Item = int(*item)
	}
	if limit != nil {
		e.Limit = *limit
	}
	return e
}

const maxInt = int(^uint(0) >> 1)

type goodbyeMsg struct {
	Type   string `msgpack:"type"`
	Reason string `msgpack:"reason"`
}

// messageFor returns an empty wire struct for a message type, for decoding.
func messageFor(typ string) (any, bool) {
	switch typ {
	case "hello":
		return &helloMsg{}, true
	case "welcome":
		return &welcomeMsg{}, true
	case "attached", "ready":
		return &typeOnlyMsg{}, true
	case "models", "ping", "pong", "ok", "stats", "health":
		return &idMsg{}, true
	case "health_report":
		return &healthReportMsg{}, true
	case "draining":
		return &drainingMsg{}, true
	case "model_stats":
		return &modelStatsMsg{}, true
	case "model_list":
		return &modelListMsg{}, true
	case "load":
		return &loadMsg{}, true
	case "unload", "reload":
		return &nameMsg{}, true
	case "error":
		return &errorMsg{}, true
	case "goodbye":
		return &goodbyeMsg{}, true
	}
	return nil, false
}

// decodeMessage decodes a frame body (SPEC §2.2): ErrProtocol for a body that is not a
// msgpack map with string keys, has no string type, an unknown type or mistyped fields.
func decodeMessage(body []byte) (string, any, error) {
	tree, err := decodeMsgpack(body)
	if err != nil {
		return "", nil, protocolErrorf("bad frame body: %v", err)
	}
	m, ok := tree.(mpMap)
	if !ok {
		return "", nil, protocolErrorf("frame body is a msgpack %s, not a map", typeName(tree))
	}
	tv, _ := m.get("type")
	typ, ok := tv.(string)
	if !ok {
		return "", nil, protocolErrorf("message without a string \"type\"")
	}
	msg, ok := messageFor(typ)
	if !ok {
		return typ, nil, protocolErrorf("unknown message type %q", typ)
	}
	if err := fromTree(m, msg, typ); err != nil {
		return typ, nil, protocolErrorf("bad %s message: %v", typ, err)
	}
	return typ, msg, nil
}
