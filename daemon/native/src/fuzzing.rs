//! The fuzz targets' bodies, here so that `cargo test` replays the committed corpus through
//! exactly the code the fuzzer explores (fuzz/fuzz_targets/*.rs only call these).
//!
//! Each takes arbitrary bytes, plays a rogue client with them, and asserts what must hold
//! whatever the client wrote: no panic, nothing read outside the mapping (the region checks
//! every access; a violation would panic there), and every accepted value within its limits.

use crate::desc;
use crate::layout::{align64, RecordHeader, CTL_HEAD, CTL_TAIL, KIND_REQUEST, RECORD_HEADER};
use crate::region::Region;
use crate::ring::{Consumer, Geometry, Producer, RecordInfo};
use crate::signature::{self, Signature, Spec};

/// Ring capacity of the fuzzed segment (small, so wrap-around is reached often).
const CAP: u64 = 4096;
/// Control block at 0, ring at 128.
const RING: u64 = 128;

/// An 8-aligned private "segment" for a fuzz case.
struct Segment(Vec<u64>);

impl Segment {
    fn new() -> Segment {
        Segment(vec![0; ((RING + CAP) / 8) as usize])
    }

    fn region(&mut self) -> Region {
        // Safety: the Vec outlives every use within one fuzz case and is never resized.
        unsafe { Region::new(self.0.as_mut_ptr() as *mut u8, self.0.len() * 8) }.unwrap()
    }
}

/// Checks one accepted request against every limit `decode_request` promises.
fn check_accepted(r: &desc::Request<'_>, data_start: u64, record_len: u64) {
    assert!(r.inputs.len() <= desc::MAX_TENSORS);
    assert!(r.priority <= 1);
    assert!(r.model.len() <= desc::MAX_NAME);
    let mut spans: Vec<(u64, u64)> = vec![];
    for t in &r.inputs {
        assert!(t.name.len() <= desc::MAX_NAME);
        assert!(t.shape.rank() <= desc::MAX_RANK);
        assert!(t.offset % 64 == 0 && t.offset >= data_start);
        assert!(t.offset + t.nbytes <= record_len);
        assert!(t.shape.dims().iter().all(|&d| d <= desc::MAX_DIM));
        if t.dtype.itemsize() > 0 {
            assert_eq!(t.shape.numel() * t.dtype.itemsize(), t.nbytes);
        }
        spans.push((t.offset, t.offset + t.nbytes));
    }
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "accepted overlapping inputs");
    }
}

/// One request record's intake, as the serving core does it: copy the descriptor out of the
/// ring, decode and check it, order it against a signature, check `bytes` tables and `bool`
/// values in place.
fn intake_record(region: &Region, rec: &RecordInfo, sig: &Signature) {
    let desc_bytes =
        region.read_vec(rec.offset + RECORD_HEADER as u64, rec.desc_len as u64).unwrap();
    let (start, len) = (rec.data_start(), rec.record_len as u64);
    let Ok(r) = desc::decode_request(&desc_bytes, start, len) else {
        return;
    };
    check_accepted(&r, start, len);
    let mut order = vec![];
    if sig.order(&r.inputs, &mut order).is_ok() {
        assert_eq!(order.len(), sig.inputs().len());
    }
    for t in &r.inputs {
        let at = rec.offset + t.offset;
        match t.dtype {
            crate::dtype::DType::Bytes => {
                let got =
                    signature::byte_strings_in(region, at, t.nbytes, t.shape.numel(), t.name, true)
                        .expect("inside the record");
                if let Ok(s) = got {
                    assert_eq!(s.offsets.len() as u64, s.count + 1);
                    assert!(s.offsets.windows(2).all(|w| w[0] <= w[1]));
                    assert_eq!(*s.offsets.last().unwrap(), t.nbytes);
                }
            }
            crate::dtype::DType::Bool => {
                let v = region.read_vec(at, t.nbytes).unwrap();
                let _ = signature::check_bools(&v, t.name);
            }
            _ => {}
        }
    }
}

/// Fuzz target `intake`: `data` is what a client wrote into its request ring (from the ring's
/// start) followed by nothing else; the tail is the end of what it wrote, rounded down to 64.
/// Every record the consumer accepts goes through the whole intake.
pub fn intake(data: &[u8]) {
    let mut seg = Segment::new();
    let region = seg.region();
    let n = data.len().min(CAP as usize);
    region.copy_in(RING, &data[..n]).unwrap();
    region.store_u64(CTL_TAIL, (n as u64) & !63).unwrap();
    let sig = Signature::new(
        "m",
        vec![
            Spec::parse("x", "f32", Some(&[-1, 4])).unwrap(),
            Spec::parse("t", "any", None).unwrap(),
        ],
        8,
        1 << 20,
    );
    let mut c = Consumer::new(Geometry::new(region, 0, RING, CAP).unwrap(), KIND_REQUEST);
    let mut got = vec![];
    if c.poll(usize::MAX, &mut got).is_err() {
        return;
    }
    for rec in &got {
        assert!(rec.offset >= RING && rec.offset + rec.record_len as u64 <= RING + CAP);
        intake_record(&region, rec, &sig);
        c.release(rec.position).unwrap();
    }
    assert_eq!(c.held(), 0);
}

/// Fuzz target `descriptor`: `data` is a descriptor alone, with a record of 4 KiB after it.
pub fn descriptor(data: &[u8]) {
    let start = align64(RECORD_HEADER as u64 + data.len() as u64);
    if let Ok(r) = desc::decode_request(data, start, start + 4096) {
        check_accepted(&r, start, start + 4096);
    }
}

/// A little reader of fuzz bytes: each op takes what it needs, zeros past the end.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, _| (v << 8) | self.byte() as u64)
    }
}

/// Fuzz target `ring`: a producer and a consumer over one ring while a rogue client also
/// scribbles over the buffer and the counters. Ops, one byte each plus arguments: publish a
/// sound record, write raw bytes, set tail, set head, poll with a limit, release a held record.
/// Whatever happens, poll either refuses (corrupt) or returns records inside the buffer and
/// within what was published, and `head` never passes what was read.
pub fn ring(data: &[u8]) {
    let mut seg = Segment::new();
    let region = seg.region();
    let g = Geometry::new(region, 0, RING, CAP).unwrap();
    let mut p = Producer::new(g);
    let mut c = Consumer::new(g, KIND_REQUEST);
    let mut held: Vec<u64> = vec![];
    let mut ops = Ops(data);
    let mut corrupt = false;
    for _ in 0..64 {
        if ops.0.is_empty() {
            break;
        }
        match ops.byte() % 6 {
            0 => {
                let n = 64 * (1 + ops.byte() as u64 % 16);
                if let Ok(Some(off)) = p.reserve(n) {
                    assert!(off >= RING && off + n <= RING + CAP);
                    let h = RecordHeader {
                        record_len: n as u32,
                        kind: KIND_REQUEST,
                        request_id: ops.u64(),
                        desc_len: ops.byte() as u32,
                    };
                    region.copy_in(off, &h.bytes()).unwrap();
                    p.publish();
                }
            }
            1 => {
                let at = RING + ops.u64() % CAP;
                let k = (ops.byte() as usize % 32).min((RING + CAP - at) as usize);
                let bytes: Vec<u8> = (0..k).map(|_| ops.byte()).collect();
                region.copy_in(at, &bytes).unwrap();
            }
            2 => region.store_u64(CTL_TAIL, ops.u64()).unwrap(),
            3 => region.store_u64(CTL_HEAD, ops.u64()).unwrap(),
            4 => {
                let limit = ops.byte() as usize;
                let tail = g.tail_word().load(std::sync::atomic::Ordering::Acquire);
                let mut got = vec![];
                match c.poll(limit, &mut got) {
                    Err(_) => corrupt = true,
                    Ok(()) => {
                        assert!(got.len() <= limit);
                        for r in &got {
                            assert!(
                                r.offset >= RING && r.offset + r.record_len as u64 <= RING + CAP
                            );
                            assert!(r.record_len % 64 == 0 && r.record_len >= 64);
                            assert!(
                                r.desc_len as u64 <= r.record_len as u64 - RECORD_HEADER as u64
                            );
                            assert!(r.position + r.record_len as u64 <= tail);
                            held.push(r.position);
                        }
                    }
                }
            }
            _ => {
                if !held.is_empty() {
                    let i = ops.byte() as usize % held.len();
                    let pos = held.swap_remove(i);
                    assert!(c.release(pos).is_ok());
                }
            }
        }
        assert!(c.head() <= c.read());
        if corrupt {
            break;
        }
    }
}
