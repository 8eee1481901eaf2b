//! Request descriptors in, response descriptors out (SPEC §4.4, §7).
//!
//! [`decode_request`] accepts and refuses exactly what the Python path does
//! (`contract/descriptors.py`: `decode_request` then `check_refs`), with the same error codes
//! and messages worded alike: any msgpack encoding of the map (any integer width, str8/16/32,
//! fix/16/32 maps and arrays, any key order, unknown keys ignored, the last of duplicate keys
//! wins), no trailing bytes, then every SPEC §7 limit. It allocates nothing but the returned
//! list of inputs: names borrow from the descriptor bytes.
//!
//! Decode from a private copy of the descriptor (a few hundred bytes), never from the shared
//! ring itself: the client may rewrite the ring while it is read, and a check must hold for
//! the bytes that are then used.

use crate::dtype::DType;
use crate::error::RequestError;
use crate::layout::{align64, ALIGN, RECORD_HEADER};
use crate::msgpack::{self, Cursor, Head, Valid};
use crate::pyrepr;

pub const MAX_DESCRIPTOR: usize = 65536;
pub const MAX_TENSORS: usize = 64;
pub const MAX_RANK: usize = 16;
pub const MAX_NAME: usize = 256;
/// No tensor has more elements; keeps size arithmetic far from overflow.
pub const MAX_DIM: u64 = 1 << 48;
pub const PRIORITIES: u64 = 2;

/// A tensor's dimensions: at most [`MAX_RANK`], each at most [`MAX_DIM`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    rank: u8,
    dims: [u64; MAX_RANK],
}

impl Shape {
    pub fn new(dims: &[u64]) -> Option<Shape> {
        if dims.len() > MAX_RANK {
            return None;
        }
        let mut s = Shape { rank: dims.len() as u8, dims: [0; MAX_RANK] };
        s.dims[..dims.len()].copy_from_slice(dims);
        Some(s)
    }

    pub fn dims(&self) -> &[u64] {
        &self.dims[..self.rank as usize]
    }

    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    /// Product of the dimensions (1 for rank 0). Checked shapes keep it at most 2^48.
    pub fn numel(&self) -> u64 {
        self.dims().iter().product()
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.dims().fmt(f)
    }
}

/// One checked input: its bytes are `[offset, offset + nbytes)` of the record, inside the data
/// area, 64-byte aligned, not overlapping another input; `nbytes` matches shape and dtype
/// (except `bytes`, whose length table is checked by [`crate::signature::byte_strings`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Shape,
    /// From the record start.
    pub offset: u64,
    pub nbytes: u64,
}

/// A checked request descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub model: &'a str,
    /// 0: no deadline.
    pub timeout_us: u64,
    /// 0 normal (also when absent or nil), 1 high.
    pub priority: u8,
    pub inputs: Vec<TensorRef<'a>>,
}

/// A tensor ref as the wire had it: types checked, values not yet. The dimensions stay in the
/// descriptor (read again by check_refs): copying 16 of them per input cost more than reading.
#[derive(Clone, Copy)]
struct RawRef<'a> {
    name: &'a str,
    dtype: &'a str,
    rank: usize,
    /// Where the shape array's items start.
    shape_at: usize,
    offset: i128,
    nbytes: i128,
}

/// Decodes and checks a request descriptor. `data_start` is the lowest offset tensor bytes may
/// use (`align64(24 + desc_len)`), `record_len` the record's length; both from the validated
/// record header.
pub fn decode_request(
    desc: &[u8],
    data_start: u64,
    record_len: u64,
) -> Result<Request<'_>, RequestError> {
    let mut inputs = Vec::new();
    let (model, timeout_us, priority) = decode_into(desc, data_start, record_len, &mut inputs)?;
    Ok(Request { model, timeout_us, priority, inputs })
}

/// [`decode_request`] into a caller's vector (cleared first), so a hot loop reuses its
/// allocation. Returns (model, timeout_us, priority).
pub fn decode_into<'a>(
    desc: &'a [u8],
    data_start: u64,
    record_len: u64,
    inputs: &mut Vec<TensorRef<'a>>,
) -> Result<(&'a str, u64, u8), RequestError> {
    inputs.clear();
    if desc.len() > MAX_DESCRIPTOR {
        return Err(RequestError::bad_request(format!(
            "descriptor of {} bytes exceeds {MAX_DESCRIPTOR}",
            desc.len()
        )));
    }
    // The Python path unpacks the whole value before it looks at any field, so a value that is
    // not msgpack is refused as such whatever else is wrong with it.
    let valid = msgpack::validate(desc).map_err(|e| {
        RequestError::bad_request(format!("request descriptor is not valid msgpack ({e})"))
    })?;
    let mut raw: Vec<RawRef<'a>> = Vec::new();
    let (model, timeout, count, priority) =
        typed(valid, &mut raw).map_err(RequestError::bad_request)?;
    limits(model, timeout, count, priority, &raw)?;
    check_refs(valid, &raw, data_start, record_len, inputs)?;
    Ok((model, timeout as u64, priority.unwrap_or(0) as u8))
}

type Typed<'a> = (&'a str, i128, usize, Option<i128>);

/// The field types, in the order (and with the messages) of the Python codec's `from_wire`:
/// model, timeout_us, inputs (each: name, dtype, shape, offset, nbytes), priority.
fn typed<'a>(valid: Valid<'a>, raw: &mut Vec<RawRef<'a>>) -> Result<Typed<'a>, String> {
    // Safety (of every trusted cursor below): each position is one that a cursor walking this
    // structure reported (a map's value start from locate(), an array's item start from pos()).
    let at = |pos: usize| unsafe { Cursor::trusted(valid, pos) };
    let mut c = at(0);
    let h = head(&mut c)?;
    let Head::Map(n) = h else {
        return Err(format!("request: expected a map, got {}", h.python_type()));
    };
    let fields = locate(&mut c, n, &["model", "timeout_us", "inputs", "priority"])?;
    let model = match field(&at, fields[0], &|| "request".into(), "model")? {
        Head::Str(s) => s,
        h => return Err(format!("request.model: expected a string, got {}", h.python_type())),
    };
    let timeout = match field(&at, fields[1], &|| "request".into(), "timeout_us")? {
        Head::Int(v) => v.get(),
        h => {
            return Err(format!("request.timeout_us: expected an integer, got {}", h.python_type()))
        }
    };
    let Some(pos) = fields[2] else {
        return Err("request: missing field 'inputs'".into());
    };
    let mut c = at(pos);
    let count = match head(&mut c)? {
        Head::Array(n) => n as usize,
        h => return Err(format!("request.inputs: expected an array, got {}", h.python_type())),
    };
    for i in 0..count {
        let what = || format!("request.inputs[{i}]");
        let h = head(&mut c)?;
        let Head::Map(n) = h else {
            return Err(format!("{}: expected a map, got {}", what(), h.python_type()));
        };
        let f = locate(&mut c, n, &["name", "dtype", "shape", "offset", "nbytes"])?;
        let name = match field(&at, f[0], &what, "name")? {
            Head::Str(s) => s,
            h => {
                return Err(format!("{}.name: expected a string, got {}", what(), h.python_type()))
            }
        };
        let dtype = match field(&at, f[1], &what, "dtype")? {
            Head::Str(s) => s,
            h => {
                return Err(format!("{}.dtype: expected a string, got {}", what(), h.python_type()))
            }
        };
        let Some(shape_at) = f[2] else {
            return Err(format!("{}: missing field 'shape'", what()));
        };
        let mut sc = at(shape_at);
        let rank = match head(&mut sc)? {
            Head::Array(n) => n as usize,
            h => {
                return Err(format!("{}.shape: expected an array, got {}", what(), h.python_type()))
            }
        };
        let items_at = sc.pos();
        for j in 0..rank {
            match head(&mut sc)? {
                Head::Int(_) => {}
                h => {
                    return Err(format!(
                        "{}.shape[{j}]: expected an integer, got {}",
                        what(),
                        h.python_type()
                    ))
                }
            }
        }
        let offset = match field(&at, f[3], &what, "offset")? {
            Head::Int(v) => v.get(),
            h => {
                return Err(format!(
                    "{}.offset: expected an integer, got {}",
                    what(),
                    h.python_type()
                ))
            }
        };
        let nbytes = match field(&at, f[4], &what, "nbytes")? {
            Head::Int(v) => v.get(),
            h => {
                return Err(format!(
                    "{}.nbytes: expected an integer, got {}",
                    what(),
                    h.python_type()
                ))
            }
        };
        if i < MAX_TENSORS {
            raw.push(RawRef { name, dtype, rank, shape_at: items_at, offset, nbytes });
        }
    }
    let priority = match fields[3] {
        None => None,
        Some(pos) => match head(&mut at(pos))? {
            Head::Nil => None,
            Head::Int(v) => Some(v.get()),
            h => {
                return Err(format!(
                    "request.priority: expected an integer, got {}",
                    h.python_type()
                ))
            }
        },
    };
    Ok((model, timeout, count, priority))
}

/// Reads a value's head in bytes already validated (an error here would be a bug in
/// `validate`, reported as invalid msgpack rather than trusted).
fn head<'a>(c: &mut Cursor<'a>) -> Result<Head<'a>, String> {
    c.head().map_err(|e| format!("request descriptor is not valid msgpack ({e})"))
}

/// Walks a map of `n` entries whose head was just read, returning where the value of each of
/// `keys` starts (the last one when a key repeats, as a Python dict keeps it); other entries
/// are skipped.
fn locate<const K: usize>(
    c: &mut Cursor<'_>,
    n: u32,
    keys: &[&str; K],
) -> Result<[Option<usize>; K], String> {
    let mut at = [None; K];
    for _ in 0..n {
        if let Head::Str(k) = head(c)? {
            if let Some(i) = keys.iter().position(|w| *w == k) {
                at[i] = Some(c.pos());
            }
        }
        c.skip(1).map_err(|e| format!("request descriptor is not valid msgpack ({e})"))?;
    }
    Ok(at)
}

/// The head of a located field; `what` names the map for the missing-field message (built
/// only then: this runs for every field of every request).
fn field<'a>(
    at: &dyn Fn(usize) -> Cursor<'a>,
    pos: Option<usize>,
    what: &dyn Fn() -> String,
    name: &str,
) -> Result<Head<'a>, String> {
    match pos {
        Some(pos) => head(&mut at(pos)),
        None => Err(format!("{}: missing field '{name}'", what())),
    }
}

/// decode_request's checks after the types: input count, name lengths, timeout, priority.
fn limits(
    model: &str,
    timeout: i128,
    count: usize,
    priority: Option<i128>,
    raw: &[RawRef<'_>],
) -> Result<(), RequestError> {
    if count > MAX_TENSORS {
        return Err(RequestError::bad_request(format!(
            "{count} inputs; at most {MAX_TENSORS} are allowed"
        )));
    }
    for s in std::iter::once(model).chain(raw.iter().map(|r| r.name)) {
        if s.len() > MAX_NAME {
            let head: String = s.chars().take(40).collect();
            return Err(RequestError::bad_request(format!(
                "name {}... is longer than {MAX_NAME} bytes",
                pyrepr::str(&head)
            )));
        }
    }
    if timeout < 0 {
        return Err(RequestError::bad_request("timeout_us is negative"));
    }
    if let Some(p) = priority {
        if !(0..PRIORITIES as i128).contains(&p) {
            return Err(RequestError::bad_request(format!(
                "priority {p} is not 0 (normal) or 1 (high)"
            )));
        }
    }
    Ok(())
}

/// The full shape of a raw ref as Python prints it.
fn shape_repr(desc: &[u8], r: &RawRef<'_>) -> String {
    let mut c = Cursor::at(desc, r.shape_at);
    let dims: Vec<i128> = (0..r.rank)
        .map(|_| match c.head() {
            Ok(Head::Int(v)) => v.get(),
            _ => 0,
        })
        .collect();
    pyrepr::int_list(dims)
}

/// SPEC §4.3/§5 for every tensor ref before any byte of it is touched (`check_refs`).
fn check_refs<'a>(
    valid: Valid<'a>,
    raw: &[RawRef<'a>],
    data_start: u64,
    record_len: u64,
    out: &mut Vec<TensorRef<'a>>,
) -> Result<(), RequestError> {
    let (ds, rl) = (data_start as i128, record_len as i128);
    for r in raw {
        let name = || pyrepr::str(r.name);
        let dtype = DType::from_name(r.dtype).ok_or_else(|| {
            RequestError::bad_input(format!(
                "unknown dtype {}; the protocol knows {}",
                pyrepr::str(r.dtype),
                DType::known()
            ))
        })?;
        if r.rank > MAX_RANK {
            return Err(RequestError::bad_input(format!(
                "input {}: rank {} exceeds {MAX_RANK}",
                name(),
                r.rank
            )));
        }
        // Safety: shape_at is where typed() read this shape's items from the same bytes.
        let mut c = unsafe { Cursor::trusted(valid, r.shape_at) };
        let mut all = [0i128; MAX_RANK];
        for d in all.iter_mut().take(r.rank) {
            *d = match c.head() {
                Ok(Head::Int(v)) => v.get(),
                _ => unreachable!("typed() checked every dimension is an integer"),
            };
        }
        let dims = &all[..r.rank];
        // max(d, 1): a 0 dimension holds nothing, but the others still make strides, which
        // must not overflow either.
        let mut clamped: i128 = 1;
        let mut bad = false;
        for &d in dims {
            if d < 0 || d > MAX_DIM as i128 {
                bad = true;
                break;
            }
            clamped *= d.max(1);
            if clamped > MAX_DIM as i128 {
                bad = true;
                break;
            }
        }
        if bad {
            return Err(RequestError::bad_input(format!(
                "input {}: shape {} has a negative or impossibly large dimension",
                name(),
                shape_repr(valid.bytes(), r)
            )));
        }
        if r.offset.rem_euclid(ALIGN as i128) != 0 {
            return Err(RequestError::bad_input(format!(
                "input {}: offset {} is not 64-byte aligned",
                name(),
                r.offset
            )));
        }
        if r.offset < ds || r.nbytes < 0 || r.offset + r.nbytes > rl {
            return Err(RequestError::bad_input(format!(
                "input {}: bytes [{}, {}) lie outside the record's data area [{data_start}, {record_len})",
                name(),
                r.offset,
                r.offset + r.nbytes
            )));
        }
        let numel: i128 = dims.iter().product();
        if dtype.itemsize() != 0 {
            let want = numel * dtype.itemsize() as i128;
            if want != r.nbytes {
                return Err(RequestError::bad_input(format!(
                    "input {}: shape {} of {} needs {want} bytes, nbytes says {}",
                    name(),
                    shape_repr(valid.bytes(), r),
                    r.dtype,
                    r.nbytes
                )));
            }
        }
        let mut shape = Shape { rank: r.rank as u8, dims: [0; MAX_RANK] };
        for (s, &d) in shape.dims.iter_mut().zip(dims) {
            *s = d as u64;
        }
        out.push(TensorRef {
            name: r.name,
            dtype,
            shape,
            offset: r.offset as u64,
            nbytes: r.nbytes as u64,
        });
    }
    // Sorted by (start, end, name), each span must start at or after the previous one's end.
    let mut spans: [(u64, u64, u8); MAX_TENSORS] = [(0, 0, 0); MAX_TENSORS];
    let spans = &mut spans[..out.len()];
    for (s, (i, t)) in spans.iter_mut().zip(out.iter().enumerate()) {
        *s = (t.offset, t.offset + t.nbytes, i as u8);
    }
    spans.sort_unstable_by(|a, b| {
        (a.0, a.1, out[a.2 as usize].name).cmp(&(b.0, b.1, out[b.2 as usize].name))
    });
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(RequestError::bad_input(format!(
                "inputs {} and {} overlap",
                pyrepr::str(out[w[0].2 as usize].name),
                pyrepr::str(out[w[1].2 as usize].name)
            )));
        }
    }
    Ok(())
}

// -- response descriptors ------------------------------------------------------------------

/// One output of a response: where its bytes are in the response record.
#[derive(Clone, Copy, Debug)]
pub struct OutputRef<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [u64],
    pub offset: u64,
    pub nbytes: u64,
}

fn write_ref(out: &mut Vec<u8>, r: &OutputRef<'_>) {
    msgpack::write_map_len(out, 5);
    msgpack::write_str(out, "name");
    msgpack::write_str(out, r.name);
    msgpack::write_str(out, "dtype");
    msgpack::write_str(out, r.dtype);
    msgpack::write_str(out, "shape");
    msgpack::write_array_len(out, r.shape.len());
    for &d in r.shape {
        msgpack::write_uint(out, d);
    }
    msgpack::write_str(out, "offset");
    msgpack::write_uint(out, r.offset);
    msgpack::write_str(out, "nbytes");
    msgpack::write_uint(out, r.nbytes);
}

/// Appends `{"outputs": [...]}` in canonical form (byte-identical to the Python encoder).
pub fn encode_response_outputs(out: &mut Vec<u8>, outputs: &[OutputRef<'_>]) {
    msgpack::write_map_len(out, 1);
    msgpack::write_str(out, "outputs");
    msgpack::write_array_len(out, outputs.len());
    for r in outputs {
        write_ref(out, r);
    }
}

/// Appends `{"error": {"code", "name", "message"}}` in canonical form.
pub fn encode_response_error(out: &mut Vec<u8>, code: u32, name: &str, message: &str) {
    encode_response_error_fields(out, code, name, message, &ErrorFields::default());
}

/// What an error is about (protocol 5, SPEC §6 "Error fields"); each written only when set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub input: Option<&'a str>,
    pub item: Option<u64>,
    pub limit: Option<u64>,
}

/// Appends `{"error": {"code", "name", "message"[, "input"][, "item"][, "limit"]}}` in
/// canonical form.
pub fn encode_response_error_fields(
    out: &mut Vec<u8>,
    code: u32,
    name: &str,
    message: &str,
    f: &ErrorFields<'_>,
) {
    let n = 3 + f.input.is_some() as usize + f.item.is_some() as usize + f.limit.is_some() as usize;
    msgpack::write_map_len(out, 1);
    msgpack::write_str(out, "error");
    msgpack::write_map_len(out, n);
    msgpack::write_str(out, "code");
    msgpack::write_uint(out, code as u64);
    msgpack::write_str(out, "name");
    msgpack::write_str(out, name);
    msgpack::write_str(out, "message");
    msgpack::write_str(out, message);
    if let Some(input) = f.input {
        msgpack::write_str(out, "input");
        msgpack::write_str(out, input);
    }
    if let Some(item) = f.item {
        msgpack::write_str(out, "item");
        msgpack::write_uint(out, item);
    }
    if let Some(limit) = f.limit {
        msgpack::write_str(out, "limit");
        msgpack::write_uint(out, limit);
    }
}

/// A response record's layout: what `transport/records.py` `plan` computes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub record_len: u64,
    pub descriptor: Vec<u8>,
    /// Each output's offset from the record start.
    pub offsets: Vec<u64>,
}

/// Chooses 64-byte aligned offsets for outputs of `(name, dtype, shape, nbytes)` and encodes
/// the descriptor naming them. Its length depends on the offsets (msgpack writes small numbers
/// shorter), so the data area start moves up until the descriptor fits in front of it —
/// exactly as the Python planner does, so both produce the same record.
pub fn plan_outputs(outputs: &[(&str, &str, &[u64], u64)]) -> Plan {
    let hdr = RECORD_HEADER as u64;
    let mut start = align64(hdr + 32 * outputs.len() as u64 + 16);
    let mut refs: Vec<OutputRef<'_>> = outputs
        .iter()
        .map(|&(name, dtype, shape, nbytes)| OutputRef { name, dtype, shape, offset: 0, nbytes })
        .collect();
    loop {
        let mut cur = start;
        for r in refs.iter_mut() {
            r.offset = cur;
            cur = align64(cur + r.nbytes);
        }
        let mut desc = Vec::new();
        encode_response_outputs(&mut desc, &refs);
        if hdr + desc.len() as u64 <= start {
            let record_len = cur.max(align64(hdr + desc.len() as u64));
            return Plan {
                record_len,
                descriptor: desc,
                offsets: refs.iter().map(|r| r.offset).collect(),
            };
        }
        start = align64(hdr + desc.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    /// A canonical request with one f32 input at 64.
    fn one(name: &str, shape: &[u64], offset: u64, nbytes: u64) -> Vec<u8> {
        let mut o = vec![];
        msgpack::write_map_len(&mut o, 3);
        msgpack::write_str(&mut o, "model");
        msgpack::write_str(&mut o, "m");
        msgpack::write_str(&mut o, "timeout_us");
        msgpack::write_uint(&mut o, 0);
        msgpack::write_str(&mut o, "inputs");
        msgpack::write_array_len(&mut o, 1);
        write_ref(&mut o, &OutputRef { name, dtype: "f32", shape, offset, nbytes });
        o
    }

    #[test]
    fn accepts_a_sound_request() {
        let d = one("x", &[2, 3], 64, 24);
        let r = decode_request(&d, 64, 128).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.inputs.len(), 1);
        assert_eq!(r.inputs[0].shape.dims(), [2, 3]);
        assert_eq!(r.inputs[0].dtype, DType::F32);
    }

    #[test]
    fn refusals_carry_the_python_codes() {
        let code = |d: &[u8]| decode_request(d, 64, 128).unwrap_err().code;
        assert_eq!(code(&one("x", &[2, 3], 64, 25)), Code::BadInput);
        assert_eq!(code(&one("x", &[2, 3], 32, 24)), Code::BadInput);
        assert_eq!(code(&one("x", &[2, 3], 128, 24)), Code::BadInput);
        assert_eq!(code(&one(&"n".repeat(257), &[2, 3], 64, 24)), Code::BadRequest);
        assert_eq!(code(&[0xc1]), Code::BadRequest);
        let mut trailing = one("x", &[2, 3], 64, 24);
        trailing.push(0);
        assert_eq!(code(&trailing), Code::BadRequest);
        let e = decode_request(&one("x", &[2, 3], 64, 25), 64, 128).unwrap_err();
        assert_eq!(e.message, "input 'x': shape [2, 3] of f32 needs 24 bytes, nbytes says 25");
    }

    #[test]
    fn plan_matches_the_python_planner_shape() {
        let p = plan_outputs(&[("y", "f32", &[2, 4], 32)]);
        // as records.plan: the data area starts past room for the descriptor
        assert_eq!(p.offsets, [128]);
        assert_eq!(p.record_len, 192);
    }
}
