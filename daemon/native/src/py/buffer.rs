//! A held Python buffer (the C API's `y*` and `w*`), released when dropped.

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

pub struct Buffer {
    view: Box<ffi::Py_buffer>,
}

// The exporter keeps the memory alive until PyBuffer_Release, which Drop calls with the GIL
// held (Buffer values live in pyclass fields, dropped by tp_dealloc, or on the stack of a call).
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    /// A contiguous buffer of `obj`; writable when asked (else exporters refuse themselves with
    /// BufferError, as `PyObject_GetBuffer` does for the C core).
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Buffer> {
        let flags = if writable { ffi::PyBUF_WRITABLE } else { ffi::PyBUF_SIMPLE };
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        // Safety: a valid object and a zeroed view to fill.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        let b = Buffer { view };
        if b.view.len < 0 || (b.view.buf.is_null() && b.view.len > 0) {
            return Err(PyBufferError::new_err("the buffer has no memory"));
        }
        Ok(b)
    }

    pub fn ptr(&self) -> *mut u8 {
        self.view.buf as *mut u8
    }

    pub fn len(&self) -> usize {
        self.view.len as usize
    }

    /// The bytes, for buffers this process does not share (descriptors, payloads).
    pub fn as_slice(&self) -> &[u8] {
        if self.len() == 0 {
            return &[];
        }
        // Safety: the exporter holds `len` contiguous bytes at `buf` until released.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        Python::attach(|_| unsafe { ffi::PyBuffer_Release(&mut *self.view) });
    }
}
