//! Where the CPU time of a DeepEP low-latency call goes (`python/examples/overhead.py`): named
//! marks on the calling thread, kept only while switched on (`_moe_ep._profile(True)`); a call
//! pays one relaxed load per mark when off.

use pyo3::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);

thread_local! {
    static MARKS: RefCell<Vec<(&'static str, Instant)>> = const { RefCell::new(Vec::new()) };
}

/// Starts a call's marks (its first line).
pub(crate) fn begin() {
    if ON.load(Ordering::Relaxed) {
        MARKS.with(|m| {
            let mut m = m.borrow_mut();
            m.clear();
            m.push(("", Instant::now()));
        });
    }
}

/// Ends the stage `name` (the time since the previous mark).
pub(crate) fn mark(name: &'static str) {
    if ON.load(Ordering::Relaxed) {
        MARKS.with(|m| {
            let mut m = m.borrow_mut();
            // A call that never began (another entry point) adds nothing past a bound.
            if m.len() < 64 {
                m.push((name, Instant::now()));
            }
        });
    }
}

/// Switches the marks on or off (for every thread).
#[pyfunction]
pub(crate) fn _profile(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// The last call's stages on this thread: `[(name, microseconds)]`, in order.
#[pyfunction]
pub(crate) fn _stages() -> Vec<(&'static str, f64)> {
    MARKS.with(|m| m.borrow().windows(2).map(|w| (w[1].0, (w[1].1 - w[0].1).as_secs_f64() * 1e6)).collect())
}
