package shmclient

import "reflect"

// The daemon's side of the descriptors: the client never encodes a response descriptor
// nor decodes a request descriptor, but the golden vector tests hold the wire structs to
// both directions.

// appendMsgpack writes exactly one key (SPEC §4.4), chosen by Error rather than by
// emptiness, so a model with zero outputs still sends "outputs": [].
func (r *responseDesc) appendMsgpack(b []byte) ([]byte, error) {
	b = appendMapHeader(b, 1)
	if r.Error != nil {
		return appendValue(appendStr(b, "error"), reflect.ValueOf(r.Error))
	}
	outs := r.Outputs
	if outs == nil {
		outs = []tensorRef{}
	}
	return appendValue(appendStr(b, "outputs"), reflect.ValueOf(outs))
}

func decodeRequestDesc(b []byte) (*requestDesc, error) {
	tree, err := decodeMsgpack(b)
	if err != nil {
		return nil, err
	}
	var d requestDesc
	if err := fromTree(tree, &d, "request"); err != nil {
		return nil, err
	}
	return &d, nil
}
