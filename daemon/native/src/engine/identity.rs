//! The built-in `identity` for large requests: a native worker of its own takes them from the
//! model's queue and answers each with its own bytes (their values checked as it gathers
//! them, batch.rs). Small ones are answered by the dispatcher itself (dispatch.rs): for them
//! a hand-off would cost more than the copy. From INLINE_MAX up the copy would hold up every
//! other session's intake for milliseconds.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use super::batch::{Batch, Output};
use super::queue::Queue;

/// Input bytes from which an identity request is answered here rather than by the dispatcher
/// (and from which any tensor's values are checked by the worker that gathers it).
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
    for k in 0..b.len() {
        let a = &b.arenas[0];
        let buf = a.buf.clone();
        let (dtype, (off, n), shape) = (a.dtype, a.spans[k], a.shapes[k].clone());
        let data = &buf.as_slice()[off as usize..(off + n) as usize];
        let done =
            b.complete_one(k, &[Output { name: "y", dtype: dtype.name(), shape: &shape, data }]);
        // k is in range: an error here is a bug, and close() answers it INTERNAL
        debug_assert!(done.is_ok(), "request {k} of a batch of {}", b.len());
    }
    b.close();
    true
}
