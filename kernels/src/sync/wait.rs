//! Deadline-bounded spin-waits and error reporting.

use crate::abi::{ErrorRecord, WaitCtx, host_flag, status};
use crate::ptx::{
    atom_relaxed_sys_global_cas_b32, ctaid_x, globaltimer, ld_acquire_sys_global_u32, ld_relaxed_sys_global_u32, st_relaxed_sys_global_u32,
    st_relaxed_sys_global_u64, st_release_sys_global_u32, tid_x,
};

/// Polls between deadline checks (a `%globaltimer` read and a check of this rank's error).
const POLLS_PER_CHECK: u32 = 32;
/// Polls between reads of the host's abort flag: that read crosses PCIe, so it stays rare (about
/// once per 0.3-1 ms of waiting; an abort still stops a wait within about a millisecond). Many
/// threads spinning on short waits would otherwise queue on PCIe reads (measured: the
/// high-throughput combine ran 15x slower with one host read per deadline check).
const POLLS_PER_HOST_CHECK: u32 = 32 * POLLS_PER_CHECK;

/// Where a kernel reports errors and how long its waits may last.
#[derive(Clone, Copy)]
pub struct Waiter {
    err: *mut ErrorRecord,
    timeout_ns: u64,
    /// This rank.
    pub rank: u32,
    /// Ranks in the group.
    pub world: u32,
}

impl Waiter {
    /// A waiter for the context the host put in the kernel's parameters.
    #[inline(always)]
    pub fn new(w: &WaitCtx) -> Self {
        Waiter { err: w.err as *mut ErrorRecord, timeout_ns: w.timeout_ns, rank: w.rank, world: w.world }
    }

    /// True once any thread of this rank has reported an error.
    #[inline(always)]
    pub fn aborted(&self) -> bool {
        // SAFETY: the host allocates the record for the lifetime of every launch.
        unsafe { ld_relaxed_sys_global_u32(&raw const (*self.err).status) != status::OK }
    }

    /// True when `value < limit`; otherwise reports [`status::BAD_INDEX`] (`kind`: a
    /// [`crate::abi::bad_index`] code, `peer`: the rank whose data held it) and returns false,
    /// so that the caller neither reads nor writes through it.
    #[inline(always)]
    pub fn index_ok(&self, value: u64, limit: u64, kind: u64, phase: u32, peer: u32) -> bool {
        if value < limit {
            return true;
        }
        self.report(status::BAD_INDEX, phase, peer, limit, value, kind);
        false
    }

    /// Reports an error unless one was already reported (the first report wins).
    pub fn report(&self, code: u32, phase: u32, peer: u32, expected: u64, seen: u64, waited_ns: u64) {
        let e = self.err;
        // SAFETY: the record is valid device memory; the claim makes this thread its only writer.
        unsafe {
            if atom_relaxed_sys_global_cas_b32(&raw mut (*e).claim, 0, 1) != 0 {
                return;
            }
            self.fill(e, phase, peer, expected, seen, waited_ns);
            st_release_sys_global_u32(&raw mut (*e).status, code);
            let host = self.host_flags();
            if !host.is_null() {
                // The host's watchdog passes this on to the peers: a copy of the fields in the
                // record's layout first, then the status, with a release.
                self.fill(host.add(host_flag::RECORD) as *mut ErrorRecord, phase, peer, expected, seen, waited_ns);
                st_release_sys_global_u32(host.add(host_flag::REPORTED), code);
            }
        }
    }

    /// Writes an error's fields (all but `claim`, `status` and `host`) into the record at `r`.
    ///
    /// # Safety
    /// `r` must be a valid, 8-aligned record (device memory or the host-mapped copy) that only
    /// this thread writes.
    #[inline(always)]
    unsafe fn fill(&self, r: *mut ErrorRecord, phase: u32, peer: u32, expected: u64, seen: u64, waited_ns: u64) {
        // SAFETY: the caller guarantees `r`.
        unsafe {
            st_relaxed_sys_global_u32(&raw mut (*r).phase, phase);
            st_relaxed_sys_global_u32(&raw mut (*r).rank, self.rank);
            st_relaxed_sys_global_u32(&raw mut (*r).peer, peer);
            st_relaxed_sys_global_u32(&raw mut (*r).block, ctaid_x());
            st_relaxed_sys_global_u32(&raw mut (*r).thread, tid_x());
            st_relaxed_sys_global_u64(&raw mut (*r).expected, expected);
            st_relaxed_sys_global_u64(&raw mut (*r).seen, seen);
            st_relaxed_sys_global_u64(&raw mut (*r).waited_ns, waited_ns);
        }
    }

    /// This rank's host-mapped flags (null: none), from the error record.
    #[inline(always)]
    fn host_flags(&self) -> *mut u32 {
        // SAFETY: the record is valid device memory; the host wrote `host` before any launch.
        unsafe { core::ptr::read_volatile(&raw const (*self.err).host) as *mut u32 }
    }

    /// True once the host raised this rank's abort flag (a peer failed); the first caller
    /// reports [`status::ABORTED`] naming the failed rank and the reason.
    #[inline(always)]
    pub fn host_aborted(&self, phase: u32, waited_ns: u64) -> bool {
        let host = self.host_flags();
        if host.is_null() {
            return false;
        }
        // SAFETY: the host keeps the flags mapped for the lifetime of every launch.
        unsafe {
            let why = ld_acquire_sys_global_u32(host.add(host_flag::ABORT));
            if why == 0 {
                return false;
            }
            let culprit = ld_relaxed_sys_global_u32(host.add(host_flag::CULPRIT));
            self.report(status::ABORTED, phase, culprit, 0, why as u64, waited_ns);
        }
        true
    }

    /// Spins with `ld.acquire.sys` on `p` until `done(value)`. Returns the value, or `None`
    /// after reporting a timeout (or when another thread of this rank already failed).
    ///
    /// # Safety
    /// `p` must be valid, aligned global memory (local or peer-mapped).
    #[inline(always)]
    pub unsafe fn spin_acquire_sys_u32(&self, p: *const u32, phase: u32, peer: u32, expected: u32, done: impl Fn(u32) -> bool) -> Option<u32> {
        let start = globaltimer();
        let mut polls = 0u32;
        loop {
            // SAFETY: the caller guarantees `p`.
            let v = unsafe { ld_acquire_sys_global_u32(p) };
            if done(v) {
                return Some(v);
            }
            polls += 1;
            if polls % POLLS_PER_CHECK == 0 {
                let host = polls == POLLS_PER_HOST_CHECK;
                if host {
                    polls = 0;
                }
                if self.must_stop(start, phase, peer, expected, v, host) {
                    return None;
                }
            }
        }
    }

    /// The slow path of a spin-wait: true, after reporting, when the deadline has passed or
    /// this rank must stop (an error here, or, when `host`, the host's abort flag, whose
    /// address it reads from the error record so that the waits carry no extra register).
    #[inline(always)]
    fn must_stop(&self, start: u64, phase: u32, peer: u32, expected: u32, seen: u32, host: bool) -> bool {
        let waited = globaltimer().wrapping_sub(start);
        if waited > self.timeout_ns {
            self.report(status::TIMEOUT, phase, peer, expected as u64, seen as u64, waited);
            return true;
        }
        self.aborted() || (host && self.host_aborted(phase, waited))
    }

    /// Waits until the u32 at `p` equals `expected`.
    ///
    /// # Safety
    /// As [`Waiter::spin_acquire_sys_u32`].
    #[inline(always)]
    pub unsafe fn wait_eq(&self, p: *const u32, expected: u32, phase: u32, peer: u32) -> bool {
        // SAFETY: forwarded.
        unsafe { self.spin_acquire_sys_u32(p, phase, peer, expected, |v| v == expected).is_some() }
    }

    /// Waits until the epoch at `p` has reached `expected` (wrapping comparison, so epochs
    /// may run past `u32::MAX`).
    ///
    /// # Safety
    /// As [`Waiter::spin_acquire_sys_u32`].
    #[inline(always)]
    pub unsafe fn wait_reached(&self, p: *const u32, expected: u32, phase: u32, peer: u32) -> bool {
        // SAFETY: forwarded.
        unsafe { self.spin_acquire_sys_u32(p, phase, peer, expected, |v| v.wrapping_sub(expected) as i32 >= 0).is_some() }
    }
}
