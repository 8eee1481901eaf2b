//! Request intake and response encoding for Python: thin wrappers for tests, benchmarks and the
//! serving core's Python side.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use super::buffer::Buffer;
use super::RequestError as PyRequestError;
use crate::desc::{self, OutputRef, Shape, TensorRef};
use crate::dtype::DType;
use crate::error::RequestError;
use crate::signature::{self, Spec};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_request, m)?)?;
    m.add_function(wrap_pyfunction!(encode_response_outputs, m)?)?;
    m.add_function(wrap_pyfunction!(encode_response_error, m)?)?;
    m.add_function(wrap_pyfunction!(plan_outputs, m)?)?;
    m.add_function(wrap_pyfunction!(byte_strings, m)?)?;
    m.add_function(wrap_pyfunction!(check_bools, m)?)?;
    m.add_class::<Signature>()?;
    Ok(())
}

/// RequestError(message) with `.code` and `.message` set.
fn raise(py: Python<'_>, e: RequestError) -> PyErr {
    let err = PyRequestError::new_err(e.message.clone());
    let value = err.value(py);
    if let Err(set) =
        value.setattr("code", e.code as u32).and_then(|_| value.setattr("message", e.message))
    {
        return set;
    }
    err
}

type RefTuple = (String, String, Vec<u64>, u64, u64);

fn ref_tuple(r: &TensorRef<'_>) -> RefTuple {
    (r.name.to_string(), r.dtype.name().to_string(), r.shape.dims().to_vec(), r.offset, r.nbytes)
}

/// decode_request(descriptor, data_start, record_len) ->
///     (model, timeout_us, priority, [(name, dtype, shape, offset, nbytes)])
/// Every check of the Python path's decode_request + check_refs; raises RequestError.
#[pyfunction]
fn decode_request<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    data_start: u64,
    record_len: u64,
) -> PyResult<Bound<'py, PyTuple>> {
    let buf = Buffer::get(data, false)?;
    let req =
        desc::decode_request(buf.as_slice(), data_start, record_len).map_err(|e| raise(py, e))?;
    let inputs = PyList::new(py, req.inputs.iter().map(ref_tuple))?;
    (req.model, req.timeout_us, req.priority, inputs).into_pyobject(py)
}

fn output_refs(outputs: &[RefTuple]) -> Vec<OutputRef<'_>> {
    outputs
        .iter()
        .map(|(name, dtype, shape, offset, nbytes)| OutputRef {
            name,
            dtype,
            shape,
            offset: *offset,
            nbytes: *nbytes,
        })
        .collect()
}

/// encode_response_outputs([(name, dtype, shape, offset, nbytes)]) -> bytes, canonical.
#[pyfunction]
fn encode_response_outputs<'py>(py: Python<'py>, outputs: Vec<RefTuple>) -> Bound<'py, PyBytes> {
    let mut out = Vec::with_capacity(64 + 48 * outputs.len());
    desc::encode_response_outputs(&mut out, &output_refs(&outputs));
    PyBytes::new(py, &out)
}

/// encode_response_error(code, name, message) -> bytes, canonical.
#[pyfunction]
fn encode_response_error<'py>(
    py: Python<'py>,
    code: u32,
    name: &str,
    message: &str,
) -> Bound<'py, PyBytes> {
    let mut out = Vec::with_capacity(48 + name.len() + message.len());
    desc::encode_response_error(&mut out, code, name, message);
    PyBytes::new(py, &out)
}

/// plan_outputs([(name, dtype, shape, nbytes)]) -> (record_len, descriptor, offsets): the
/// response record's layout, as transport/records.py plan() makes it.
#[pyfunction]
fn plan_outputs<'py>(
    py: Python<'py>,
    outputs: Vec<(String, String, Vec<u64>, u64)>,
) -> PyResult<Bound<'py, PyTuple>> {
    let items: Vec<(&str, &str, &[u64], u64)> =
        outputs.iter().map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.as_slice(), *b)).collect();
    let p = desc::plan_outputs(&items);
    (p.record_len, PyBytes::new(py, &p.descriptor), p.offsets).into_pyobject(py)
}

/// byte_strings(data, count, name) -> bytes of count + 1 little-endian u64 offsets into
/// `data`: string i is data[offsets[i]:offsets[i + 1]]. Checks the length table against
/// len(data) as SPEC §5 says; raises RequestError (BAD_INPUT).
#[pyfunction]
fn byte_strings<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    count: u64,
    name: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let buf = Buffer::get(data, false)?;
    let t = signature::byte_strings(buf.as_slice(), count, name).map_err(|e| raise(py, e))?;
    let raw: Vec<u8> = t.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    Ok(PyBytes::new(py, &raw))
}

/// check_bools(data, name): RequestError (BAD_INPUT) when a byte is not 0 or 1.
#[pyfunction]
fn check_bools(py: Python<'_>, data: &Bound<'_, PyAny>, name: &str) -> PyResult<()> {
    let buf = Buffer::get(data, false)?;
    signature::check_bools(buf.as_slice(), name).map_err(|e| raise(py, e))
}

/// A model's compiled input signature.
#[pyclass(module = "tensord._core", frozen)]
pub struct Signature {
    inner: signature::Signature,
}

fn refs_from(refs: &[RefTuple]) -> PyResult<Vec<TensorRef<'_>>> {
    refs.iter()
        .map(|(name, dtype, shape, offset, nbytes)| {
            let dtype = DType::from_name(dtype)
                .ok_or_else(|| PyValueError::new_err(format!("unknown dtype {dtype:?}")))?;
            let shape = Shape::new(shape).ok_or_else(|| PyValueError::new_err("rank above 16"))?;
            Ok(TensorRef { name, dtype, shape, offset: *offset, nbytes: *nbytes })
        })
        .collect()
}

#[pymethods]
impl Signature {
    /// Signature(model, [(name, dtype or "any", shape or None)], max_batch=0,
    /// max_input_bytes=0); shapes hold sizes or -1.
    #[new]
    #[pyo3(signature = (model, inputs, max_batch = 0, max_input_bytes = 0))]
    fn new(
        model: &str,
        inputs: Vec<(String, String, Option<Vec<i64>>)>,
        max_batch: u64,
        max_input_bytes: u64,
    ) -> PyResult<Signature> {
        let specs = inputs
            .iter()
            .map(|(n, d, s)| Spec::parse(n, d, s.as_deref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PyValueError::new_err)?;
        Ok(Signature { inner: signature::Signature::new(model, specs, max_batch, max_input_bytes) })
    }

    /// order([(name, dtype, shape, offset, nbytes)]) -> indexes of the refs in the model's
    /// input order; raises RequestError (BAD_INPUT, TOO_LARGE).
    fn order(&self, py: Python<'_>, refs: Vec<RefTuple>) -> PyResult<Vec<usize>> {
        let refs = refs_from(&refs)?;
        let mut order = Vec::with_capacity(refs.len());
        self.inner.order(&refs, &mut order).map_err(|e| raise(py, e))?;
        Ok(order)
    }

    /// intake(descriptor, data_start, record_len) -> (model, timeout_us, priority,
    /// [(name, dtype, shape, offset, nbytes)] in the model's order): decode_request, then
    /// order, in one native call (what the serving core does per request).
    fn intake<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        data_start: u64,
        record_len: u64,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let buf = Buffer::get(data, false)?;
        let req = desc::decode_request(buf.as_slice(), data_start, record_len)
            .map_err(|e| raise(py, e))?;
        let mut order = Vec::with_capacity(req.inputs.len());
        self.inner.order(&req.inputs, &mut order).map_err(|e| raise(py, e))?;
        let inputs = PyList::new(py, order.iter().map(|&i| ref_tuple(&req.inputs[i])))?;
        (req.model, req.timeout_us, req.priority, inputs).into_pyobject(py)
    }

    #[getter]
    fn model(&self) -> &str {
        self.inner.model()
    }
}
