//! Writes into another rank's memory: the one seam between the low-latency kernels and their
//! transport.
//!
//! A rank is reached directly (its heap base in the buffer's rank table; plain stores over
//! NVLink, or on one GPU) unless its table entry carries [`RANK_PUT`]. Then, in the NVSHMEM
//! module (feature `nvshmem`), each write is an NVSHMEM call at this rank's own symmetric address
//! with that rank as the PE: the host sets such a rank's entry to this rank's own heap base, so
//! the kernels' address arithmetic yields the symmetric address unchanged.
//!
//! Rows travel by staging: the kernel stores a row into this rank's own copy of its
//! destination's place (or another staging place of its own heap), then [`Remote::put_warp`]
//! sends it from there (NVSHMEM reads a put's source from symmetric memory, which a NIC can
//! reach). Small values (flags, routing rows) go as single-value puts; arrival counters as
//! NVSHMEM atomics, after [`Remote::signal_all_ranks`] has completed the block's puts.
//!
//! In the default module no rank is a put rank (`Remote::new` ignores the launch's flag there,
//! and the host refuses put ranks for that module), so every branch below folds to the direct
//! store.

use crate::abi::RANK_PUT;
use crate::dev::FULL;
#[cfg(feature = "nvshmem")]
use crate::nvshmem as nv;
use crate::ptx::{
    bar_sync_0, bar_warp_sync, fence_acq_rel_sys, ld_global_nc_s64, red_relaxed_sys_global_add_u32, st_global_u32, st_global_v4_u32,
    st_relaxed_sys_global_u32, tid_x,
};
use crate::sync::Waiter;

/// Entry `r` of a launch's rank table ([`crate::abi::HeapTables::ranks`]).
///
/// # Safety
/// `table` must hold more than `r` entries (the launch's rank count); it is never written
/// while a kernel runs.
#[inline(always)]
unsafe fn entry(table: u64, r: u32) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { ld_global_nc_s64((table as *const i64).add(r as usize)) as u64 }
}

/// Heap base of rank `r` as this process maps it (this rank's own base for a put rank).
///
/// # Safety
/// As [`entry`].
#[inline(always)]
pub unsafe fn rank_base(table: u64, r: u32) -> u64 {
    // SAFETY: forwarded.
    unsafe { entry(table, r) & !RANK_PUT }
}

/// How a launch reaches every rank: its rank table, and whether any rank is a put rank.
#[derive(Clone, Copy)]
pub struct Remote {
    table: u64,
    any: bool,
}

// Outside the NVSHMEM module the rank arguments only select the put branch, which is compiled out.
#[cfg_attr(not(feature = "nvshmem"), allow(unused_variables))]
impl Remote {
    /// A launch's rank table and put flag (no put rank outside the NVSHMEM module).
    ///
    /// # Safety
    /// `table` must hold an entry for every rank of the launch, unchanged while it runs.
    #[inline(always)]
    pub unsafe fn new(table: u64, any_put: u32) -> Self {
        Remote { table, any: cfg!(feature = "nvshmem") && any_put != 0 }
    }

    /// Heap base of rank `d` as mapped here (this rank's own for a put rank).
    ///
    /// # Safety
    /// `d` must be below the launch's rank count (the table has no entry past it).
    #[inline(always)]
    pub unsafe fn base(&self, d: u32) -> u64 {
        // SAFETY: `new`'s contract and the caller's.
        unsafe { rank_base(self.table, d) }
    }

    /// Whether rank `d` is reached by NVSHMEM calls.
    ///
    /// # Safety
    /// As [`Remote::base`].
    #[inline(always)]
    pub unsafe fn put(&self, d: u32) -> bool {
        // SAFETY: as in `base`.
        self.any && unsafe { entry(self.table, d) } & RANK_PUT != 0
    }

    /// Whether any rank is reached by NVSHMEM calls.
    #[inline(always)]
    pub fn any(&self) -> bool {
        self.any
    }

    /// A flag: `st.relaxed.sys` into rank `d`'s memory, or a single-value put.
    ///
    /// # Safety
    /// `a` must be a `u32` of rank `d`'s heap as the rank table maps it (this rank's own
    /// symmetric address of it for a put rank).
    #[inline(always)]
    pub unsafe fn st_relaxed_sys_u32(&self, d: u32, a: *mut u32, v: u32) {
        #[cfg(feature = "nvshmem")]
        // SAFETY: `d` is a rank of the launch (the caller's contract).
        if unsafe { self.put(d) } {
            // SAFETY: `a` is a symmetric address of this rank (the caller's contract).
            unsafe { nv::nvshmem_uint32_p(a, v, d as i32) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { st_relaxed_sys_global_u32(a, v) }
    }

    /// A word of payload: `st.global` into rank `d`'s memory, or a single-value put.
    ///
    /// # Safety
    /// As [`Remote::st_relaxed_sys_u32`].
    #[inline(always)]
    pub unsafe fn st_u32(&self, d: u32, a: *mut u32, v: u32) {
        #[cfg(feature = "nvshmem")]
        // SAFETY: `d` is a rank of the launch (the caller's contract).
        if unsafe { self.put(d) } {
            // SAFETY: as above.
            unsafe { nv::nvshmem_uint32_p(a, v, d as i32) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { st_global_u32(a, v) }
    }

    /// 16 bytes of payload: `st.global.v4.u32` into rank `d`'s memory, or two 8-byte puts.
    ///
    /// # Safety
    /// As [`Remote::st_relaxed_sys_u32`], for 16 bytes aligned to 16.
    #[inline(always)]
    pub unsafe fn st_v4_u32(&self, d: u32, a: *mut [u32; 4], v: [u32; 4]) {
        #[cfg(feature = "nvshmem")]
        // SAFETY: `d` is a rank of the launch (the caller's contract).
        if unsafe { self.put(d) } {
            let w = a.cast::<u64>();
            // SAFETY: as above; both words lie in the 16 bytes at `a`.
            unsafe {
                nv::nvshmem_uint64_p(w, v[0] as u64 | (v[1] as u64) << 32, d as i32);
                nv::nvshmem_uint64_p(w.add(1), v[2] as u64 | (v[3] as u64) << 32, d as i32);
            }
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { st_global_v4_u32(a, v) }
    }

    /// A signal: `red.relaxed.sys.add` on rank `d`'s counter, or an NVSHMEM atomic add.
    ///
    /// # Safety
    /// As [`Remote::st_relaxed_sys_u32`].
    #[inline(always)]
    pub unsafe fn red_add_u32(&self, d: u32, a: *mut u32, v: u32) {
        #[cfg(feature = "nvshmem")]
        // SAFETY: `d` is a rank of the launch (the caller's contract).
        if unsafe { self.put(d) } {
            // SAFETY: as above.
            unsafe { nv::nvshmem_uint32_atomic_add(a, v, d as i32) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { red_relaxed_sys_global_add_u32(a, v) }
    }

    /// An addition to this rank's own counter `a` that source rank `s` raises: for a put source,
    /// an NVSHMEM atomic on this PE (`own`), since NVSHMEM makes its atomics atomic only with
    /// each other (a NIC's atomic on GPU memory is not atomic with the GPU's); else
    /// `red.relaxed.sys.add`.
    ///
    /// # Safety
    /// `a` must be a valid `u32` of this rank's heap.
    #[inline(always)]
    pub unsafe fn own_counter_add(&self, s: u32, own: u32, a: *mut u32, v: u32) {
        #[cfg(feature = "nvshmem")]
        // SAFETY: `s` is a rank of the launch (the caller's contract).
        if unsafe { self.put(s) } {
            // SAFETY: `a` is a symmetric address of this rank (the caller's contract).
            unsafe { nv::nvshmem_uint32_atomic_add(a, v, own as i32) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { red_relaxed_sys_global_add_u32(a, v) }
    }

    /// Warp-collective (every lane, same arguments): sends `bytes` at this rank's symmetric
    /// address `src`, already written (by this warp, or by the block before a barrier), to
    /// `dst` (this rank's symmetric address of the destination) on rank `d`. Nothing for a
    /// rank reached directly.
    ///
    /// # Safety
    /// `src..src + bytes` and `dst..dst + bytes` must lie in this rank's symmetric heap; the
    /// writes of the data must be ordered before the call (this warp's own, or the block's with
    /// a barrier, and `fence.acq_rel.sys`, since a NIC reads the source).
    #[inline(always)]
    pub unsafe fn put_warp(&self, d: u32, dst: u64, src: u64, bytes: u64) {
        #[cfg(feature = "nvshmem")]
        // SAFETY: `d` is a rank of the launch (the caller's contract).
        if unsafe { self.put(d) } {
            // SAFETY: the caller's contract; NVSHMEM reads `bytes` at `src` here and writes
            // them at `dst` on PE `d`.
            unsafe { nv::nvshmemx_putmem_nbi_warp(dst as *mut core::ffi::c_void, src as *const core::ffi::c_void, bytes as usize, d as i32) };
        }
    }

    /// [`Remote::put_warp`] of data this warp has just written (`fence.acq_rel.sys`, since a NIC
    /// reads the source, and a warp barrier first).
    ///
    /// # Safety
    /// As [`Remote::put_warp`]; the data is this warp's own writes.
    #[inline(always)]
    pub unsafe fn put_warp_written(&self, d: u32, dst: u64, src: u64, bytes: u64) {
        fence_acq_rel_sys();
        bar_warp_sync(FULL);
        // SAFETY: the caller's contract; the writes are ordered before the put above.
        unsafe { self.put_warp(d, dst, src, bytes) }
    }

    /// Every thread of the block: completes the block's NVSHMEM writes (`nvshmem_quiet`, per
    /// thread), then, as [`crate::sync::signal_all_ranks`], thread 0 fences and adds 1 to
    /// `counter(r)` on every rank, with an NVSHMEM atomic for a put rank. With no put rank it is
    /// `signal_all_ranks` itself.
    ///
    /// # Safety
    /// `counter(r)` must give a valid u32 of rank `r`'s heap as the rank table maps it; all
    /// threads of the block must call it.
    #[inline(always)]
    pub unsafe fn signal_all_ranks(&self, w: &Waiter, counter: impl Fn(u32) -> *mut u32) {
        if !self.any {
            // SAFETY: the caller's contract.
            return unsafe { crate::sync::signal_all_ranks(w, counter) };
        }
        #[cfg(feature = "nvshmem")]
        // SAFETY: completes this thread's puts; no memory is named.
        unsafe {
            nv::nvshmem_quiet()
        };
        bar_sync_0();
        if tid_x() == 0 {
            fence_acq_rel_sys();
            for r in 0..w.world {
                // SAFETY: the caller's contract.
                unsafe { self.red_add_u32(r, counter(r), 1) };
            }
        }
    }
}
