//! `Consumer`, `Producer` and `spin_any` over a `Shm`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::shm::{offset, region_err, Shm};
use super::CorruptError;
use crate::ring::{self, Geometry, GeometryError, RecordInfo};
use crate::wake;

fn geometry(shm: &Shm, ctl: i64, ring: i64, cap: u64) -> PyResult<Geometry> {
    let r = shm.region()?;
    // The C core's order of complaints: capacity, then the ranges.
    if cap < 64 || !cap.is_power_of_two() {
        return Err(PyValueError::new_err(GeometryError::Capacity(cap).to_string()));
    }
    let ring = offset(ring, cap.min(i64::MAX as u64) as i64, shm.size())?;
    let ctl = offset(ctl, 8, shm.size())?;
    Geometry::new(r, ctl, ring, cap).map_err(|e| match e {
        GeometryError::Region(e) => region_err(e),
        e => PyValueError::new_err(e.to_string()),
    })
}

/// The consumer of one ring: validated reads, out-of-order release.
#[pyclass(module = "tensord._core")]
pub struct Consumer {
    shm: Py<Shm>,
    core: ring::Consumer,
    found: Vec<RecordInfo>,
}

impl Consumer {
    fn live(&self) -> PyResult<()> {
        self.shm.get().region().map(|_| ())
    }
}

#[pymethods]
impl Consumer {
    /// Consumer(shm, ctl, ring, capacity, kind): `ctl` is the control block's offset.
    #[new]
    fn new(shm: &Bound<'_, PyAny>, ctl: i64, ring: i64, cap: u64, kind: u32) -> PyResult<Consumer> {
        let shm = shm.cast::<Shm>().map_err(|_| PyTypeError::new_err("expected a Shm"))?;
        let g = geometry(shm.get(), ctl, ring, cap)?;
        Ok(Consumer {
            shm: shm.clone().unbind(),
            core: ring::Consumer::new(g, kind),
            found: Vec::new(),
        })
    }

    /// poll(limit) -> [(position, offset, request_id, desc_len, record_len)]: at most `limit`
    /// records per call, PADs included. Raises CorruptError when the producer broke SPEC
    /// §4.2/§4.8.
    fn poll<'py>(&mut self, py: Python<'py>, limit: i64) -> PyResult<Bound<'py, PyList>> {
        self.live()?;
        self.found.clear();
        let limit = limit.max(0) as usize;
        self.core.poll(limit, &mut self.found).map_err(|e| CorruptError::new_err(e.to_string()))?;
        let items = self
            .found
            .iter()
            .map(|r| (r.position, r.offset, r.request_id, r.desc_len, r.record_len));
        PyList::new(py, items)
    }

    /// release(position) -> bool: mark a record done; True when head moved.
    fn release(&mut self, position: u64) -> PyResult<bool> {
        self.live()?;
        self.core.release(position).map_err(|e| PyKeyError::new_err(e.to_string()))
    }

    /// Whether unread records exist.
    fn published(&self) -> PyResult<bool> {
        self.live()?;
        Ok(self.core.published())
    }

    #[getter]
    fn read(&self) -> u64 {
        self.core.read()
    }

    #[getter]
    fn head(&self) -> u64 {
        self.core.head()
    }

    #[getter]
    fn held(&self) -> usize {
        self.core.held()
    }

    #[getter]
    fn capacity(&self) -> u64 {
        self.core.capacity()
    }
}

/// The producer of one ring: reserve, fill, publish.
#[pyclass(module = "tensord._core")]
pub struct Producer {
    shm: Py<Shm>,
    core: ring::Producer,
}

impl Producer {
    fn live(&self) -> PyResult<()> {
        self.shm.get().region().map(|_| ())
    }
}

#[pymethods]
impl Producer {
    /// Producer(shm, ctl, ring, capacity)
    #[new]
    fn new(shm: &Bound<'_, PyAny>, ctl: i64, ring: i64, cap: u64) -> PyResult<Producer> {
        let shm = shm.cast::<Shm>().map_err(|_| PyTypeError::new_err("expected a Shm"))?;
        let g = geometry(shm.get(), ctl, ring, cap)?;
        Ok(Producer { shm: shm.clone().unbind(), core: ring::Producer::new(g) })
    }

    /// reserve(record_len) -> segment offset of the record, or -1 while there is no space.
    fn reserve(&mut self, n: u64) -> PyResult<i64> {
        self.live()?;
        match self.core.reserve(n) {
            Ok(Some(off)) => Ok(off as i64),
            Ok(None) => Ok(-1),
            Err(e) => Err(PyValueError::new_err(e.to_string())),
        }
    }

    /// Whether reserve would succeed now.
    fn fits(&self, n: u64) -> PyResult<bool> {
        self.live()?;
        self.core.fits(n).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Release-store tail.
    fn publish(&self) -> PyResult<()> {
        self.live()?;
        self.core.publish();
        Ok(())
    }

    #[getter]
    fn tail(&self) -> u64 {
        self.core.tail()
    }

    #[getter]
    fn head(&self) -> PyResult<u64> {
        self.live()?;
        Ok(self.core.head())
    }

    #[getter]
    fn capacity(&self) -> u64 {
        self.core.capacity()
    }
}

/// spin_any(consumers, spin_ns) -> index of the first consumer with unread records, or -1
/// after spin_ns. Polls without the GIL, so a spinning dispatcher never holds up the threads
/// that run models. The caller keeps every consumer's mapping alive for the call.
#[pyfunction]
pub fn spin_any(py: Python<'_>, consumers: &Bound<'_, PyAny>, spin_ns: i64) -> PyResult<i64> {
    let tuple = consumers.cast::<PyTuple>().map_err(|_| {
        PyTypeError::new_err(format!(
            "spin_any() argument 1 must be tuple, not {}",
            consumers.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let mut regions = Vec::with_capacity(tuple.len());
    for item in tuple.iter() {
        let c = item.cast::<Consumer>().map_err(|_| PyTypeError::new_err("expected Consumers"))?;
        let c = c.borrow();
        c.live()?;
        regions.push((*c.core.geometry(), c.core.read()));
    }
    let tails: Vec<(&AtomicU64, u64)> =
        regions.iter().map(|(g, read)| (g.tail_word(), *read)).collect();
    let spin = Duration::from_nanos(spin_ns.max(0) as u64);
    Ok(py.detach(|| wake::spin_any(&tails, spin)).map_or(-1, |i| i as i64))
}
