//! The golden vectors of protocol/vectors (SPEC §8), read by this crate as by Python and Go:
//! request descriptors decode to their `value`, response descriptors encode to their `hex`,
//! record headers round-trip, and a consumer over `ring_image.bin` finds exactly the records
//! `ring_image.json` describes.

use std::path::PathBuf;

use serde_json::Value;
use tensord_core::desc::{self, OutputRef};
use tensord_core::layout::{RecordHeader, KIND_REQUEST, KIND_RESPONSE, RECORD_HEADER};
use tensord_core::region::Region;
use tensord_core::ring::{Consumer, Geometry};
use tensord_core::signature;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protocol/vectors")
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(vectors_dir().join(name)).expect("vectors file");
    serde_json::from_str(&text).expect("vectors JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// Checks a decoded request against its JSON value.
fn same_request(got: &desc::Request<'_>, want: &Value) {
    assert_eq!(got.model, want["model"].as_str().unwrap());
    assert_eq!(got.timeout_us, want["timeout_us"].as_u64().unwrap());
    assert_eq!(got.priority as u64, want.get("priority").and_then(Value::as_u64).unwrap_or(0));
    let inputs = want["inputs"].as_array().unwrap();
    assert_eq!(got.inputs.len(), inputs.len());
    for (t, w) in got.inputs.iter().zip(inputs) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        assert_eq!(t.dtype.name(), w["dtype"].as_str().unwrap());
        let shape: Vec<u64> =
            w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(t.shape.dims(), shape);
        assert_eq!(t.offset, w["offset"].as_u64().unwrap());
        assert_eq!(t.nbytes, w["nbytes"].as_u64().unwrap());
    }
}

/// Encodes a response descriptor's JSON value with the native encoder.
fn encode_response(v: &Value) -> Vec<u8> {
    let mut out = vec![];
    if let Some(e) = v.get("error") {
        // Protocol 5's optional fields, written only when the vector has them.
        let fields = desc::ErrorFields {
            input: e.get("input").map(|x| x.as_str().unwrap()),
            item: e.get("item").map(|x| x.as_u64().unwrap()),
            limit: e.get("limit").map(|x| x.as_u64().unwrap()),
        };
        desc::encode_response_error_fields(
            &mut out,
            e["code"].as_u64().unwrap() as u32,
            e["name"].as_str().unwrap(),
            e["message"].as_str().unwrap(),
            &fields,
        );
        return out;
    }
    let outputs = v["outputs"].as_array().unwrap();
    let shapes: Vec<Vec<u64>> = outputs
        .iter()
        .map(|o| o["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect())
        .collect();
    let refs: Vec<OutputRef<'_>> = outputs
        .iter()
        .zip(&shapes)
        .map(|(o, s)| OutputRef {
            name: o["name"].as_str().unwrap(),
            dtype: o["dtype"].as_str().unwrap(),
            shape: s,
            offset: o["offset"].as_u64().unwrap(),
            nbytes: o["nbytes"].as_u64().unwrap(),
        })
        .collect();
    desc::encode_response_outputs(&mut out, &refs);
    out
}

#[test]
fn descriptor_and_header_vectors() {
    let cases = load("vectors.json");
    let mut seen = [0; 3];
    for c in cases.as_array().unwrap() {
        let hexes: Vec<&str> = std::iter::once(c["hex"].as_str().unwrap())
            .chain(
                c.get("alt_hex")
                    .into_iter()
                    .flat_map(|a| a.as_array().unwrap())
                    .map(|h| h.as_str().unwrap()),
            )
            .collect();
        match c["kind"].as_str().unwrap() {
            "request_descriptor" => {
                for h in hexes {
                    // A record as large as any vector needs: every tensor ref fits in it.
                    let bytes = unhex(h);
                    let r = desc::decode_request(&bytes, 64, 1 << 20)
                        .unwrap_or_else(|e| panic!("{}: {e}", c["name"]));
                    same_request(&r, &c["value"]);
                }
                seen[0] += 1;
            }
            "response_descriptor" => {
                assert_eq!(encode_response(&c["value"]), unhex(hexes[0]), "{}", c["name"]);
                seen[1] += 1;
            }
            "record_header" => {
                let raw = unhex(hexes[0]);
                let h = RecordHeader::parse(raw[..RECORD_HEADER].try_into().unwrap());
                let v = &c["value"];
                assert_eq!(h.record_len as u64, v["record_len"].as_u64().unwrap());
                assert_eq!(h.kind as u64, v["kind"].as_u64().unwrap());
                assert_eq!(h.request_id, v["request_id"].as_u64().unwrap());
                assert_eq!(h.desc_len as u64, v["desc_len"].as_u64().unwrap());
                assert_eq!(h.bytes().to_vec(), raw);
                seen[2] += 1;
            }
            _ => {}
        }
    }
    assert!(seen.iter().all(|&n| n >= 2), "every kind of vector was read: {seen:?}");
}

#[test]
fn ring_image() {
    let want = load("ring_image.json");
    let bytes = std::fs::read(vectors_dir().join("ring_image.bin")).unwrap();
    let mut mem = vec![0u64; bytes.len().div_ceil(8)];
    // Safety: `mem` outlives every use of the region below.
    let region = unsafe { Region::new(mem.as_mut_ptr() as *mut u8, bytes.len()) }.unwrap();
    region.copy_in(0, &bytes).unwrap();
    assert_eq!(region.len(), want["segment_size"].as_u64().unwrap());
    let u64_at = |off: u64| region.load_u64(off).unwrap();
    let (req_off, req_cap, resp_off, resp_cap) = (u64_at(24), u64_at(32), u64_at(40), u64_at(48));
    for (ring, ctl, off, cap, kind) in [
        ("request_ring", 128, req_off, req_cap, KIND_REQUEST),
        ("response_ring", 256, resp_off, resp_cap, KIND_RESPONSE),
    ] {
        let w = &want[ring];
        let mut c = Consumer::new(Geometry::new(region, ctl, off, cap).unwrap(), kind);
        assert_eq!(c.head(), w["head"].as_u64().unwrap());
        let mut got = vec![];
        c.poll(usize::MAX, &mut got).unwrap();
        assert_eq!(c.read(), w["tail"].as_u64().unwrap());
        let records: Vec<&Value> = w["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"].as_u64().unwrap() == kind as u64)
            .collect();
        assert_eq!(got.len(), records.len(), "{ring}: PADs skipped, every record found");
        for (r, v) in got.iter().zip(records) {
            assert_eq!(r.position, v["position"].as_u64().unwrap());
            assert_eq!(r.offset, v["segment_offset"].as_u64().unwrap());
            assert_eq!(r.request_id, v["request_id"].as_u64().unwrap());
            assert_eq!(r.desc_len as u64, v["desc_len"].as_u64().unwrap());
            assert_eq!(r.record_len as u64, v["record_len"].as_u64().unwrap());
            let d = region.read_vec(r.offset + RECORD_HEADER as u64, r.desc_len as u64).unwrap();
            let tensors = v["tensors"].as_array().unwrap();
            if kind == KIND_REQUEST {
                let q = desc::decode_request(&d, r.data_start(), r.record_len as u64).unwrap();
                same_request(&q, &v["descriptor"]);
                for (t, hex) in q.inputs.iter().zip(tensors) {
                    let data = region.read_vec(r.offset + t.offset, t.nbytes).unwrap();
                    assert_eq!(data, unhex(hex.as_str().unwrap()), "{}", t.name);
                    if t.dtype.itemsize() == 0 {
                        let s = signature::byte_strings(&data, t.shape.numel(), t.name).unwrap();
                        assert_eq!(s.count, 2);
                        assert_eq!(&data[s.offsets[0] as usize..s.offsets[1] as usize], b"hello");
                    }
                }
            } else {
                assert_eq!(d, encode_response(&v["descriptor"]), "canonical response bytes");
            }
            assert!(c.release(r.position).unwrap());
        }
    }
}
