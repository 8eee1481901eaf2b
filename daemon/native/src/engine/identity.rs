//! The built-in `identity` for large requests: a native worker of its own takes them from the
//! model's queue, checks their values and answers each with its own bytes. Small ones are
//! answered by the dispatcher itself (dispatch.rs): for them a hand-off would cost more than
//! the copy. From INLINE_MAX up the copy (and a `bytes` tensor's length table: 11 M strings
//! in 64 MiB) would hold up every other session's intake for tens of milliseconds.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use super::batch::{Batch, Output};
use super::queue::Queue;
use crate::desc::ErrorFields;
use crate::dtype::DType;
use crate::signature;

/// Input bytes from which an identity request is answered here rather than by the dispatcher.
pub const INLINE_MAX: u64 = 1 << 20;

/// Starts the worker of an identity queue; it ends once the queue is retired and drained.
pub fn spawn(q: Arc<Queue>) -> std::io::Result<()> {
    std::thread::Builder::new().name("identity".into()).spawn(move || serve(q)).map(|_| ())
}

fn serve(q: Arc<Queue>) {
    // A panic (an allocation that failed) costs its batch, which answers INTERNAL as it is
    // dropped, never the thread: every later large identity request would wait in vain.
    while let Ok(true) = std::panic::catch_unwind(AssertUnwindSafe(|| one(&q))) {}
}

/// Takes and answers one batch; false once the queue is retired and drained.
fn one(q: &Arc<Queue>) -> bool {
    let Some((id, jobs)) = q.take() else {
        return false;
    };
    let mut b = Batch::gather(q.clone(), id, jobs);
    let name = q.sig.inputs().first().map_or("x", |s| s.name.as_str());
    for k in 0..b.len() {
        answer(&mut b, k, name);
    }
    b.close();
    true
}

/// Request `k` answered with its input, once its values are checked as intake would have.
fn answer(b: &mut Batch, k: usize, name: &str) {
    let a = &b.arenas[0];
    let buf = a.buf.clone();
    let (dtype, (off, n), shape) = (a.dtype, a.spans[k], a.shapes[k].clone());
    let data = &buf.as_slice()[off as usize..(off + n) as usize];
    let checked = match dtype {
        DType::Bytes => signature::check_byte_strings(data, shape.iter().product(), name),
        DType::Bool => signature::check_bools(data, name),
        _ => Ok(()),
    };
    let done = match checked {
        Ok(()) => {
            b.complete_one(k, &[Output { name: "y", dtype: dtype.name(), shape: &shape, data }])
        }
        Err(e) => {
            let f = ErrorFields { input: e.input.as_deref(), item: None, limit: e.limit };
            b.fail_fields(k, k + 1, e.code, &e.message, &f)
        }
    };
    // k is in range: an error here is a bug, and close() answers it INTERNAL
    debug_assert!(done.is_ok(), "request {k} of a batch of {}", b.len());
}
