//! The clock of the per-call timings (`last_api_us`, `last_ext_us`): the CPU's time-stamp
//! counter on x86-64 (`rdtsc`, a few nanoseconds a read, against 35-45 ns for a
//! `clock_gettime` on the GPU machines), so that timing every call costs the call almost
//! nothing. Ticks become microseconds only when a timing is read, at a rate measured once
//! against [`Instant`] (10 ms, the first time a timing is read). The timings are diagnostics:
//! they assume the invariant time-stamp counter, the same on every core, of current x86-64
//! servers (the GPU machines' CPUs report `constant_tsc` and `nonstop_tsc`). Elsewhere the ticks
//! are nanoseconds since the first read.

use pyo3::Python;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A reading of the clock, in ticks.
#[inline]
pub(crate) fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `rdtsc` reads the time-stamp counter; it has no preconditions and every
        // x86-64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks per microsecond, measured the first time.
static RATE: OnceLock<f64> = OnceLock::new();

fn rate() -> f64 {
    *RATE.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1e3;
        }
        let (t0, c0) = (Instant::now(), ticks());
        while t0.elapsed() < Duration::from_millis(10) {
            std::hint::spin_loop();
        }
        let (dt, dc) = (t0.elapsed(), ticks().saturating_sub(c0));
        dc as f64 / (dt.as_secs_f64() * 1e6)
    })
}

/// The ticks from `t0` to now (0 should the counter read earlier than `t0`).
pub(crate) fn since(t0: u64) -> u64 {
    ticks().saturating_sub(t0)
}

/// Microseconds in `n` ticks (the first call measures the rate with the GIL released).
pub(crate) fn micros(py: Python<'_>, n: u64) -> f64 {
    if RATE.get().is_none() {
        py.allow_threads(|| {
            rate();
        });
    }
    n as f64 / rate()
}
