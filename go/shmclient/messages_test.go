package shmclient

import "github.com/vmihailenco/msgpack/v5"

// The daemon's side of the descriptors: the client never encodes a response descriptor
// nor decodes a request descriptor, but the golden vector tests hold the wire structs to
// both directions.

// EncodeMsgpack writes exactly one key (SPEC §4.4), chosen by Error rather than by
// emptiness, so a model with zero outputs still sends "outputs": [].
func (r *responseDesc) EncodeMsgpack(enc *msgpack.Encoder) error {
	if err := enc.EncodeMapLen(1); err != nil {
		return err
	}
	if r.Error != nil {
		if err := enc.EncodeString("error"); err != nil {
			return err
		}
		return enc.Encode(r.Error)
	}
	if err := enc.EncodeString("outputs"); err != nil {
		return err
	}
	outs := r.Outputs
	if outs == nil {
		outs = []tensorRef{}
	}
	return enc.Encode(outs)
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
