//! tensord's native core: what touches a client's shared memory, in Rust.
//!
//! Pure modules (no Python), for the daemon's serving core and for `cargo test`:
//! - [`region`]: a bounds-checked view of a shared mapping (atomics, copies);
//! - [`ring`]: the SPSC rings of SPEC §4.2–§4.8 (validated reads, out-of-order release,
//!   reserve with PAD, publish);
//! - [`wake`]: eventfd posts and the spin-then-block wait of SPEC §4.5;
//! - [`desc`]: the request descriptor decoder with every SPEC §7 check, and the canonical
//!   response descriptor encoder;
//! - [`signature`]: a model's compiled input signature, `bytes` and `bool` value checks;
//! - [`msgpack`], [`dtype`], [`error`], [`layout`]: what those share.
//!
//! With the `python` feature, [`py`] exposes them as the extension module `tensord._core`.

pub mod desc;
pub mod dtype;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
pub mod msgpack;
pub mod pyrepr;
pub mod region;
pub mod ring;
pub mod signature;
pub mod wake;

#[cfg(feature = "python")]
pub mod py;

/// Tests that open and close descriptors hold this: the serving core's stale-event test needs
/// the process's lowest free descriptor numbers to itself.
#[cfg(test)]
pub(crate) static TEST_FDS: std::sync::Mutex<()> = std::sync::Mutex::new(());
