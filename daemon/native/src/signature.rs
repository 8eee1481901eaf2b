//! A model's compiled input signature, and the per-input value checks of a request.
//!
//! [`Signature::order`] checks a request's inputs and orders them as the model takes them,
//! like `models/signature.py` `Signature.order_inputs` plus the session's `max_input_bytes`
//! check, with the same codes and messages. [`byte_strings`] and [`check_bools`] are the
//! session's per-input value checks (`_input`) for `bytes` and `bool` tensors.

use crate::desc::{TensorRef, MAX_TENSORS};
use crate::dtype::DType;
use crate::error::{Code, RequestError};
use crate::pyrepr;
use crate::region::{Region, RegionError};

/// One declared input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    /// None: the model takes every dtype ("any").
    pub dtype: Option<DType>,
    /// None: any rank. Otherwise one entry per dimension, -1 for any size.
    pub shape: Option<Vec<i64>>,
}

impl Spec {
    /// From the config's words: dtype a wire name or "any", shape sizes or -1.
    pub fn parse(name: &str, dtype: &str, shape: Option<&[i64]>) -> Result<Spec, String> {
        let dt = if dtype == "any" {
            None
        } else {
            Some(DType::from_name(dtype).ok_or_else(|| {
                format!("input {}: unknown dtype {}", pyrepr::str(name), pyrepr::str(dtype))
            })?)
        };
        if let Some(s) = shape {
            if s.iter().any(|&d| d < -1) {
                return Err(format!(
                    "input {}: shape {} must hold sizes or -1",
                    pyrepr::str(name),
                    pyrepr::int_list(s)
                ));
            }
        }
        Ok(Spec { name: name.to_string(), dtype: dt, shape: shape.map(|s| s.to_vec()) })
    }

    fn dtype_name(&self) -> &'static str {
        self.dtype.map_or("any", DType::name)
    }

    /// `x: f32 [?, 16]`, as error messages show a spec.
    pub fn describe(&self) -> String {
        let shape = match &self.shape {
            None => "any shape".to_string(),
            Some(s) => {
                let parts: Vec<String> =
                    s.iter().map(|&d| if d < 0 { "?".into() } else { d.to_string() }).collect();
                format!("[{}]", parts.join(", "))
            }
        };
        format!("{}: {} {}", self.name, self.dtype_name(), shape)
    }

    /// None when a tensor of `dtype` and `dims` fits; otherwise why not.
    pub fn accepts(&self, dtype: DType, dims: &[u64]) -> Option<String> {
        if let Some(want) = self.dtype {
            if want != dtype {
                return Some(format!("dtype {}, the model takes {}", dtype.name(), want.name()));
            }
        }
        if let Some(s) = &self.shape {
            if s.len() != dims.len() {
                return Some(format!(
                    "rank {} (shape {}), the model takes {}",
                    dims.len(),
                    pyrepr::int_list(dims),
                    self.describe()
                ));
            }
            if s.iter().zip(dims).any(|(&w, &g)| w >= 0 && g != w as u64) {
                return Some(format!(
                    "shape {}, the model takes {}",
                    pyrepr::int_list(dims),
                    self.describe()
                ));
            }
        }
        None
    }
}

/// A model's inputs and per-request limits, compiled once per model load.
#[derive(Clone, Debug)]
pub struct Signature {
    model: String,
    inputs: Vec<Spec>,
    /// Most rows (dimension 0 of the first input) per request; 0 = any.
    max_batch: u64,
    /// Most input bytes per request; 0 = any.
    max_input_bytes: u64,
    /// Most input bytes per request that the daemon's compute memory admits (issue 19.1), and
    /// the sentence that says why, in the caller's terms; 0 = any.
    compute: (u64, String),
    /// No two inputs share a name (else no request can match, as in the Python path).
    names_unique: bool,
}

impl Signature {
    pub fn new(model: &str, inputs: Vec<Spec>, max_batch: u64, max_input_bytes: u64) -> Signature {
        let names_unique =
            inputs.iter().enumerate().all(|(i, s)| inputs[..i].iter().all(|t| t.name != s.name));
        Signature {
            model: model.to_string(),
            inputs,
            max_batch,
            max_input_bytes,
            compute: (0, String::new()),
            names_unique,
        }
    }

    /// The same signature, admitting at most `bytes` of input per request for the memory a
    /// forward pass takes; `why` says how that bound follows from the config.
    pub fn with_compute_bound(mut self, bytes: u64, why: &str) -> Signature {
        self.compute = (bytes, why.to_string());
        self
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn inputs(&self) -> &[Spec] {
        &self.inputs
    }

    /// Checks a request's inputs against the signature and writes into `order` the index in
    /// `refs` of each declared input, in the model's order. Errors: TOO_LARGE over
    /// max_input_bytes, else BAD_INPUT (a name given twice, names that differ from the
    /// declared ones, a dtype or shape the model does not take, more rows than max_batch).
    pub fn order(
        &self,
        refs: &[TensorRef<'_>],
        order: &mut Vec<usize>,
    ) -> Result<(), RequestError> {
        order.clear();
        let model = || pyrepr::str(&self.model);
        let (bound, why) = &self.compute;
        let total: u128 = refs.iter().map(|r| r.nbytes as u128).sum();
        if self.max_input_bytes != 0 && total > self.max_input_bytes as u128 {
            return Err(RequestError::new(
                Code::TooLarge,
                format!(
                    "the request's inputs are {total} bytes; model {} takes at most {} \
                     (max_input_bytes in its config): send smaller requests",
                    model(),
                    self.max_input_bytes
                ),
            )
            .past(self.max_input_bytes));
        }
        if *bound != 0 && total > *bound as u128 {
            return Err(RequestError::new(
                Code::TooLarge,
                format!(
                    "the request's inputs are {total} bytes; model {} takes at most {bound} \
                     bytes per request ({why}): send fewer rows per request",
                    model(),
                ),
            )
            .past(*bound));
        }
        for (i, r) in refs.iter().enumerate() {
            if refs[..i].iter().any(|q| q.name == r.name) {
                return Err(RequestError::bad_input(format!(
                    "input {} is given twice",
                    pyrepr::str(r.name)
                ))
                .about(r.name));
            }
        }
        // Names now unique on both sides (or the declared ones are not, and nothing matches):
        // the sets are equal when the counts are and every declared name is present.
        let mut matched = self.names_unique && refs.len() == self.inputs.len();
        if matched {
            for spec in &self.inputs {
                match refs.iter().position(|r| r.name == spec.name) {
                    Some(i) => order.push(i),
                    None => {
                        matched = false;
                        break;
                    }
                }
            }
        }
        if !matched {
            order.clear();
            return Err(RequestError::bad_input(format!(
                "model {} takes inputs {}, the request has {}",
                model(),
                pyrepr::str_list(self.inputs.iter().map(|s| s.name.as_str())),
                pyrepr::str_list(refs.iter().map(|r| r.name))
            )));
        }
        for (spec, &i) in self.inputs.iter().zip(order.iter()) {
            if let Some(why) = spec.accepts(refs[i].dtype, refs[i].shape.dims()) {
                let e = format!("model {} input {}: got {why}", model(), pyrepr::str(&spec.name));
                order.clear();
                return Err(RequestError::bad_input(e).about(&spec.name));
            }
        }
        if let Some(&first) = order.first() {
            if let Some(&rows) = refs[first].shape.dims().first() {
                if self.max_batch != 0 && rows > self.max_batch {
                    order.clear();
                    return Err(RequestError::bad_input(format!(
                        "model {} takes at most {} items per request (limits.max_batch), the \
                         request has {rows}",
                        model(),
                        self.max_batch
                    ))
                    .about(refs[first].name)
                    .past(self.max_batch));
                }
            }
        }
        debug_assert!(order.len() <= MAX_TENSORS);
        Ok(())
    }
}

/// A checked `bytes` tensor (SPEC §5): `count` strings; string `i` is bytes
/// `[offsets[i], offsets[i + 1])` of the tensor's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByteStrings {
    pub count: u64,
    /// `count + 1` offsets from the tensor's first byte; the first is `4 * count`, the last
    /// `nbytes`.
    pub offsets: Vec<u64>,
}

const TABLE_CHUNK: usize = 1024;

/// Checks a `bytes` tensor's length table against its `nbytes` (as `decode_byte_strings`
/// does) and returns where each string is, reading the table once, so the offsets stay valid
/// whatever the client writes afterwards. `read(first, buf)` fills `buf` with table bytes
/// starting at table byte `first`. `name` is the input's name for messages. `keep` false:
/// only checks (no offsets kept: 8 bytes per string that a check does not need).
fn byte_strings_with(
    count: u64,
    nbytes: u64,
    name: &str,
    keep: bool,
    mut read: impl FnMut(u64, &mut [u8]),
) -> Result<ByteStrings, RequestError> {
    let table = 4u128 * count as u128;
    if table > nbytes as u128 {
        return Err(RequestError::bad_input(format!(
            "input {}: bytes tensor of {count} strings needs a {table}-byte length table, but \
             nbytes is {nbytes}",
            pyrepr::str(name)
        )));
    }
    let mut offsets = Vec::with_capacity(if keep { count as usize + 1 } else { 0 });
    let mut pos = table as u64; // <= nbytes
    let mut total: u128 = table;
    if keep {
        offsets.push(pos);
    }
    let mut chunk = [0u8; 4 * TABLE_CHUNK];
    let mut done = 0u64;
    while done < count {
        let k = ((count - done) as usize).min(TABLE_CHUNK);
        read(4 * done, &mut chunk[..4 * k]);
        for w in chunk[..4 * k].chunks_exact(4) {
            let len = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as u64;
            total += len as u128;
            // Past nbytes the sum can only grow: stop here, the error below reports it.
            pos = pos.saturating_add(len);
            if keep {
                offsets.push(pos.min(nbytes));
            }
        }
        done += k as u64;
    }
    if total != nbytes as u128 {
        return Err(RequestError::bad_input(format!(
            "input {}: bytes tensor lengths add up to {total} bytes, but nbytes is {nbytes}",
            pyrepr::str(name)
        )));
    }
    Ok(ByteStrings { count, offsets })
}

/// [`ByteStrings`] of a `bytes` tensor held in `data` (its `nbytes` bytes) with `count` =
/// product of its shape.
pub fn byte_strings(data: &[u8], count: u64, name: &str) -> Result<ByteStrings, RequestError> {
    byte_strings_with(count, data.len() as u64, name, true, |first, buf| {
        let f = first as usize;
        buf.copy_from_slice(&data[f..f + buf.len()]);
    })
}

/// [`byte_strings`] for a tensor at `off` in shared memory, read through the region's checked
/// copies; `keep` false: only checked (the offsets are left empty).
pub fn byte_strings_in(
    region: &Region,
    off: u64,
    nbytes: u64,
    count: u64,
    name: &str,
    keep: bool,
) -> Result<Result<ByteStrings, RequestError>, RegionError> {
    region.check(off, nbytes)?;
    Ok(byte_strings_with(count, nbytes, name, keep, |first, buf| {
        region.copy_out(off + first, buf).expect("inside the checked tensor");
    }))
}

/// The values checks of SPEC §5 for a tensor at `off` in shared memory: a `bytes` tensor's
/// length table, a `bool` tensor's bytes; other dtypes have none. Reads in chunks, keeping
/// nothing. The error names the input (protocol 5's `input` field).
pub fn check_values_in(
    region: &Region,
    off: u64,
    dtype: DType,
    nbytes: u64,
    count: u64,
    name: &str,
) -> Result<Result<(), RequestError>, RegionError> {
    match dtype {
        DType::Bytes => Ok(byte_strings_in(region, off, nbytes, count, name, false)?
            .map(|_| ())
            .map_err(|e| e.about(name))),
        DType::Bool => {
            region.check(off, nbytes)?;
            let mut chunk = [0u8; 16 * 1024];
            let mut done = 0u64;
            while done < nbytes {
                let k = ((nbytes - done) as usize).min(chunk.len());
                region.copy_out(off + done, &mut chunk[..k]).expect("inside the checked tensor");
                if let Err(e) = check_bools(&chunk[..k], name) {
                    return Ok(Err(e.about(name)));
                }
                done += k as u64;
            }
            Ok(Ok(()))
        }
        _ => Ok(Ok(())),
    }
}

/// BAD_INPUT when a `bool` tensor holds a byte other than 0 and 1.
pub fn check_bools(data: &[u8], name: &str) -> Result<(), RequestError> {
    if data.iter().any(|&b| b > 1) {
        return Err(RequestError::bad_input(format!(
            "input {}: bool tensor holds bytes other than 0 and 1",
            pyrepr::str(name)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::Shape;

    fn r<'a>(name: &'a str, dtype: DType, dims: &[u64]) -> TensorRef<'a> {
        TensorRef { name, dtype, shape: Shape::new(dims).unwrap(), offset: 64, nbytes: 64 }
    }

    fn sig() -> Signature {
        Signature::new(
            "mlp",
            vec![
                Spec::parse("x", "f32", Some(&[-1, 16])).unwrap(),
                Spec::parse("mask", "any", None).unwrap(),
            ],
            8,
            0,
        )
    }

    #[test]
    fn orders_inputs_by_the_signature() {
        let mut o = vec![];
        sig().order(&[r("mask", DType::U8, &[3]), r("x", DType::F32, &[2, 16])], &mut o).unwrap();
        assert_eq!(o, [1, 0]);
    }

    #[test]
    fn refuses_like_order_inputs() {
        let s = sig();
        let mut o = vec![];
        let msg = |refs: &[TensorRef<'_>]| {
            let mut o = vec![];
            let e = s.order(refs, &mut o).unwrap_err();
            assert_eq!(e.code, Code::BadInput);
            e.message
        };
        assert_eq!(
            msg(&[r("x", DType::F32, &[1, 16]), r("x", DType::F32, &[1, 16])]),
            "input 'x' is given twice"
        );
        assert_eq!(
            msg(&[r("x", DType::F32, &[1, 16])]),
            "model 'mlp' takes inputs ['x', 'mask'], the request has ['x']"
        );
        assert_eq!(
            msg(&[r("x", DType::F32, &[2, 15]), r("mask", DType::U8, &[])]),
            "model 'mlp' input 'x': got shape [2, 15], the model takes x: f32 [?, 16]"
        );
        assert_eq!(
            msg(&[r("x", DType::F64, &[2, 16]), r("mask", DType::U8, &[])]),
            "model 'mlp' input 'x': got dtype f64, the model takes f32"
        );
        assert_eq!(
            msg(&[r("x", DType::F32, &[16]), r("mask", DType::U8, &[])]),
            "model 'mlp' input 'x': got rank 1 (shape [16]), the model takes x: f32 [?, 16]"
        );
        assert_eq!(
            msg(&[r("x", DType::F32, &[9, 16]), r("mask", DType::U8, &[])]),
            "model 'mlp' takes at most 8 items per request (limits.max_batch), the request has 9"
        );
        let big = Signature::new("m", vec![Spec::parse("x", "any", None).unwrap()], 0, 63);
        let e = big.order(&[r("x", DType::U8, &[64])], &mut o).unwrap_err();
        assert_eq!(e.code, Code::TooLarge);
        let bounded = |b| {
            Signature::new("m", vec![Spec::parse("x", "any", None).unwrap()], 0, 0)
                .with_compute_bound(b, "the reason")
        };
        bounded(64).order(&[r("x", DType::U8, &[64])], &mut o).unwrap(); // 64 bytes: at the bound
        let e = bounded(63).order(&[r("x", DType::U8, &[64])], &mut o).unwrap_err();
        assert_eq!((e.code, e.limit), (Code::TooLarge, Some(63)));
        assert_eq!(
            e.message,
            "the request's inputs are 64 bytes; model 'm' takes at most 63 bytes per request \
             (the reason): send fewer rows per request"
        );
        assert!(Spec::parse("x", "f31", None).is_err());
        assert!(Spec::parse("x", "f32", Some(&[-2])).is_err());
    }

    #[test]
    fn byte_string_tables_are_checked_against_nbytes() {
        let mut data = vec![];
        for s in [&b"ab"[..], b"", b"xyz"] {
            data.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        data.extend_from_slice(b"abxyz");
        let t = byte_strings(&data, 3, "t").unwrap();
        assert_eq!(t.offsets, [12, 14, 14, 17]);
        assert_eq!(
            byte_strings(&data, 5, "t").unwrap_err().message,
            "input 't': bytes tensor of 5 strings needs a 20-byte length table, but nbytes is 17"
        );
        data.push(0);
        assert_eq!(
            byte_strings(&data, 3, "t").unwrap_err().message,
            "input 't': bytes tensor lengths add up to 17 bytes, but nbytes is 18"
        );
        let huge = [0xffu8; 8];
        assert!(byte_strings(&huge, 2, "t").is_err());
        assert!(check_bools(&[0, 1, 1], "b").is_ok());
        assert!(check_bools(&[0, 2], "b").is_err());
    }
}
