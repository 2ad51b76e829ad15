//! The clock of the per-call timings (`last_api_us`, `last_ext_us`): the CPU's time-stamp
//! counter on x86-64 (`rdtsc`, a few nanoseconds a read, against 35-45 ns for a
//! `clock_gettime` on the GPU machines), so that timing every call costs the call almost
//! nothing. Ticks become microseconds only when a timing is read, at a rate measured once
//! against [`Instant`] (10 ms, the first time a timing is read). The timings are diagnostics:
//! they assume the invariant time-stamp counter, the same on every core, of current x86-64
//! servers (the GPU machines' CPUs report `constant_tsc` and `nonstop_tsc`). Elsewhere the ticks
//! are nanoseconds since the first read.

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

/// Ticks per microsecond.
fn rate() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1e3;
        }
        let (t0, c0) = (Instant::now(), ticks());
        while t0.elapsed() < Duration::from_millis(10) {
            std::hint::spin_loop();
        }
        let (dt, dc) = (t0.elapsed(), ticks().wrapping_sub(c0));
        dc as f64 / (dt.as_secs_f64() * 1e6)
    })
}

/// Microseconds in `n` ticks.
pub(crate) fn micros(n: u64) -> f64 {
    n as f64 / rate()
}
