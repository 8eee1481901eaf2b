//! `Shm`: one writable mapping with atomic accessors, copies and wake-ups at byte offsets.

use std::sync::atomic::{fence, AtomicPtr, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use super::buffer::Buffer;
use crate::region::{Region, RegionError};
use crate::ring::{self, WriteError};
use crate::wake;

/// Copies at least this long release the GIL.
const COPY_WITHOUT_GIL: usize = 64 * 1024;

/// A raw pointer that may cross into a closure run without the GIL (the mapping it points into
/// is kept alive by the caller for the call, as the C core did).
pub(crate) struct SendPtr(pub *mut u8);
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// By method, so a closure captures the wrapper (Send), not its raw field.
    fn get(&self) -> *mut u8 {
        self.0
    }
}

#[pyclass(module = "tensord._core", frozen)]
pub struct Shm {
    /// Null once closed; every call checks it (a closed view raises, never touches memory).
    base: AtomicPtr<u8>,
    size: usize,
    view: Mutex<Option<Buffer>>,
}

pub(crate) fn region_err(e: RegionError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The C core took offsets as signed: a negative one gets the same message it gave.
pub(crate) fn offset(off: i64, n: i64, size: usize) -> PyResult<u64> {
    if off < 0 || n < 0 {
        return Err(PyValueError::new_err(format!(
            "range [{off}, {}) lies outside the {size}-byte segment",
            off as i128 + n as i128
        )));
    }
    Ok(off as u64)
}

impl Shm {
    /// The live mapping, or ValueError once closed.
    pub(crate) fn region(&self) -> PyResult<Region> {
        let base = self.base.load(Ordering::Acquire);
        // Safety: non-null means the buffer is still held (close() nulls base first).
        match unsafe { Region::new(base, self.size) } {
            Some(r) => Ok(r),
            None => Err(PyValueError::new_err("the shared-memory view is closed")),
        }
    }

    fn at(&self, off: i64, n: i64) -> PyResult<(Region, u64)> {
        let r = self.region()?;
        Ok((r, offset(off, n, self.size)?))
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

#[pymethods]
impl Shm {
    /// Shm(buffer): a writable, 64-byte aligned buffer (an mmap).
    #[new]
    fn new(obj: &Bound<'_, PyAny>) -> PyResult<Shm> {
        let view = Buffer::get(obj, true)?;
        if view.ptr() as usize % 64 != 0 {
            return Err(PyValueError::new_err("the mapping must be 64-byte aligned"));
        }
        if view.ptr().is_null() {
            return Err(PyRuntimeError::new_err("the mapping is empty"));
        }
        Ok(Shm { base: AtomicPtr::new(view.ptr()), size: view.len(), view: Mutex::new(Some(view)) })
    }

    /// Release the mapping (idempotent).
    fn close(&self) {
        self.base.store(std::ptr::null_mut(), Ordering::Release);
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(view);
    }

    #[getter]
    fn closed(&self) -> bool {
        self.base.load(Ordering::Acquire).is_null()
    }

    #[getter(size)]
    fn py_size(&self) -> usize {
        self.size
    }

    /// Acquire-load a u64.
    fn load64(&self, off: i64) -> PyResult<u64> {
        let (r, off) = self.at(off, 8)?;
        r.load_u64(off).map_err(region_err)
    }

    /// Release-store a u64.
    fn store64(&self, off: i64, v: u64) -> PyResult<()> {
        let (r, off) = self.at(off, 8)?;
        r.store_u64(off, v).map_err(region_err)
    }

    /// Acquire-load a u32.
    fn load32(&self, off: i64) -> PyResult<u32> {
        let (r, off) = self.at(off, 4)?;
        r.load_u32(off).map_err(region_err)
    }

    /// Release-store a u32, then a full fence: a flag store is always followed by a re-check.
    fn store32(&self, off: i64, v: u32) -> PyResult<()> {
        let (r, off) = self.at(off, 4)?;
        r.store_u32(off, v).map_err(region_err)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// notify(flag_off, efd) -> bool: fence, then post efd if the flag is set (SPEC §4.5).
    fn notify(&self, py: Python<'_>, flag: i64, efd: i32) -> PyResult<bool> {
        let (r, flag) = self.at(flag, 4)?;
        let word = r.atomic_u32(flag).map_err(region_err)?;
        if wake::wants_post(word) {
            // The write wakes a sleeping peer, which can take microseconds: let other
            // threads run meanwhile.
            py.detach(|| wake::post(efd));
            return Ok(true);
        }
        Ok(false)
    }

    /// Post an eventfd unconditionally. A number that cannot be a descriptor is the caller's
    /// bug, refused as the C core's last version did (errors of the write itself are ignored:
    /// a wake-up is only a hint).
    fn post(&self, efd: i64) -> PyResult<()> {
        if !(0..=i32::MAX as i64).contains(&efd) {
            return Err(PyValueError::new_err(format!("{efd} is not a file descriptor")));
        }
        wake::post(efd as i32);
        Ok(())
    }

    /// wait(counter_off, seen, flag_off, efd, spin_ns, timeout_ns) -> bool: spin-then-block
    /// without the GIL until the u64 at counter_off differs from `seen`; False when
    /// timeout_ns (< 0: none) passes first.
    #[allow(clippy::too_many_arguments)]
    fn wait(
        &self,
        py: Python<'_>,
        counter: i64,
        seen: u64,
        flag: i64,
        efd: i32,
        spin_ns: i64,
        timeout_ns: i64,
    ) -> PyResult<bool> {
        let (r, c) = self.at(counter, 8)?;
        let c = r.atomic_u64(c).map_err(region_err)?;
        let f = r.atomic_u32(offset(flag, 4, self.size)?).map_err(region_err)?;
        let spin = Duration::from_nanos(spin_ns.max(0) as u64);
        let timeout = (timeout_ns >= 0).then(|| Duration::from_nanos(timeout_ns as u64));
        Ok(py.detach(|| wake::wait(c, seen, f, efd, spin, timeout)))
    }

    /// copy_in(off, src): copy a buffer into the segment; without the GIL when it is large.
    fn copy_in(&self, py: Python<'_>, off: i64, src: &Bound<'_, PyAny>) -> PyResult<()> {
        let src = Buffer::get(src, false)?;
        let (r, off) = self.at(off, src.len() as i64)?;
        let dst = SendPtr(r.ptr(off, src.len() as u64).map_err(region_err)?);
        let (from, n) = (SendPtr(src.ptr()), src.len());
        // Safety: both ranges are checked (the source is held by `src` for the call).
        let copy = move || unsafe { std::ptr::copy_nonoverlapping(from.get(), dst.get(), n) };
        if n >= COPY_WITHOUT_GIL {
            py.detach(copy);
        } else if n > 0 {
            copy();
        }
        Ok(())
    }

    /// copy_out(off, n) -> bytes
    fn copy_out<'py>(&self, py: Python<'py>, off: i64, n: i64) -> PyResult<Bound<'py, PyBytes>> {
        let (r, off) = self.at(off, n)?;
        r.check(off, n as u64).map_err(region_err)?;
        PyBytes::new_with(py, n as usize, |buf| r.copy_out(off, buf).map_err(region_err))
    }

    /// write_record(off, kind, request_id, record_len, descriptor): header + descriptor bytes.
    fn write_record(
        &self,
        off: i64,
        kind: u32,
        request_id: u64,
        record_len: i64,
        desc: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let desc = Buffer::get(desc, false)?;
        if record_len < (crate::layout::RECORD_HEADER + desc.len()) as i64
            || record_len > u32::MAX as i64
        {
            return Err(PyValueError::new_err(format!(
                "a {record_len}-byte record cannot hold a {}-byte descriptor",
                desc.len()
            )));
        }
        let (r, off) = self.at(off, record_len)?;
        ring::write_record(&r, off, kind, request_id, record_len as u64, desc.as_slice()).map_err(
            |e| match e {
                WriteError::Region(e) => region_err(e),
                e => PyValueError::new_err(e.to_string()),
            },
        )
    }

    /// read_header(off) -> (record_len, kind, request_id, desc_len); no validation.
    fn read_header<'py>(&self, py: Python<'py>, off: i64) -> PyResult<Bound<'py, PyTuple>> {
        let (r, off) = self.at(off, crate::layout::RECORD_HEADER as i64)?;
        let h = ring::read_header(&r, off).map_err(region_err)?;
        PyTuple::new(py, [h.record_len as u64, h.kind as u64, h.request_id, h.desc_len as u64])
    }

    /// A full memory barrier.
    fn fence(&self) {
        fence(Ordering::SeqCst);
    }
}
