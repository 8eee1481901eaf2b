//! The extension module `tensord._core` (feature `python`): thin PyO3 bindings over the pure
//! modules. The ring API (`Shm`, `Consumer`, `Producer`, `spin_any`, `CorruptError`) is the one
//! the C core `_ring.c` had, method for method and message for message; the intake API
//! (`decode_request`, `encode_response_*`, `plan_outputs`, `Signature`, `byte_strings`,
//! `check_bools`, `RequestError`) is new. The GIL is released around waits, spins, wake-up
//! posts and copies of 64 KiB or more, as the C core did.

use pyo3::prelude::*;

mod buffer;
mod engine;
mod intake;
mod rings;
mod shm;

pyo3::create_exception!(
    _core,
    CorruptError,
    pyo3::exceptions::PyValueError,
    "The producer of a ring broke SPEC §4.2/§4.8: the session must end (BAD_RECORD)."
);

pyo3::create_exception!(
    _core,
    RequestError,
    pyo3::exceptions::PyValueError,
    "A request refused before it ran: `.code` (the SPEC §6 number) and `.message`."
);

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CorruptError", py.get_type::<CorruptError>())?;
    m.add("RequestError", py.get_type::<RequestError>())?;
    m.add_class::<shm::Shm>()?;
    m.add_class::<rings::Consumer>()?;
    m.add_class::<rings::Producer>()?;
    m.add_function(wrap_pyfunction!(rings::spin_any, m)?)?;
    intake::register(m)?;
    engine::register(m)?;
    Ok(())
}
