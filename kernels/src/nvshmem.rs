//! NVSHMEM probe kernels (feature `nvshmem`): Rust kernels calling NVSHMEM's device library,
//! declared here as `extern "C"` and linked in from NVSHMEM's LLVM bitcode
//! (`libnvshmem_device_sm_90.bc`) by `cargo xtask build-ptx --nvshmem`, which emits them as a
//! second PTX module. The default build leaves this module out.

use crate::abi::{NvshmemPingPongParams, NvshmemPutParams};
use crate::ptx::{ctaid_x, globaltimer, laneid, nctaid_x, st_global_u64, tid_x};
use core::ffi::c_void;

/// `NVSHMEM_SIGNAL_SET` (`nvshmemx_signal_op_t`).
const SIGNAL_SET: i32 = 9;
/// `NVSHMEM_CMP_GE` (`nvshmem_cmp_type`).
const CMP_GE: i32 = 5;

// NVSHMEM's device API (C symbols of NVSHMEM's device bitcode, `libnvshmem_device.bc` of 3.4.5).
// The low-latency kernels' put path (`crate::remote`) uses the `pub(crate)` ones.
unsafe extern "C" {
    fn nvshmemx_putmem_signal_nbi_warp(dest: *mut c_void, src: *const c_void, bytes: usize, sig: *mut u64, signal: u64, sig_op: i32, pe: i32);
    fn nvshmem_signal_wait_until(sig: *mut u64, cmp: i32, value: u64) -> u64;
    fn nvshmemx_putmem_nbi_block(dest: *mut c_void, src: *const c_void, bytes: usize, pe: i32);
    /// Completes every put and AMO this PE issued before it (the data is in the target's memory).
    pub(crate) fn nvshmem_quiet();
    /// Warp-collective non-blocking put of `bytes` from this PE's `src` to `pe`'s copy of `dest`.
    pub(crate) fn nvshmemx_putmem_nbi_warp(dest: *mut c_void, src: *const c_void, bytes: usize, pe: i32);
    /// Stores one value into `pe`'s copy of `dest`.
    pub(crate) fn nvshmem_uint32_p(dest: *mut u32, value: u32, pe: i32);
    pub(crate) fn nvshmem_uint64_p(dest: *mut u64, value: u64, pe: i32);
    /// Atomic add on `pe`'s copy of `dest` (no value fetched).
    pub(crate) fn nvshmem_uint32_atomic_add(dest: *mut u32, value: u32, pe: i32);
}

/// Round trips of a put with signal: the initiator puts its word and raises the peer's signal
/// to the round number, then waits for its own signal to reach it; the other side answers.
/// One warp (every lane calls the warp-collective put).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn nvshmem_ping_pong(p: NvshmemPingPongParams) {
    if ctaid_x() != 0 || tid_x() >= 32 {
        return;
    }
    let data = p.data as *mut u64;
    let sig = p.signal as *mut u64;
    let t0 = globaltimer();
    for i in 1..=p.iters as u64 {
        // SAFETY: `data` and `sig` are symmetric allocations of this PE (NVSHMEM maps the
        // peer's copies); the put sends the first word into the peer's second.
        unsafe {
            if p.initiator != 0 {
                nvshmemx_putmem_signal_nbi_warp(data.add(1) as *mut c_void, data as *const c_void, 8, sig, i, SIGNAL_SET, p.peer);
                nvshmem_signal_wait_until(sig, CMP_GE, i);
            } else {
                nvshmem_signal_wait_until(sig, CMP_GE, i);
                nvshmemx_putmem_signal_nbi_warp(data.add(1) as *mut c_void, data as *const c_void, 8, sig, i, SIGNAL_SET, p.peer);
            }
        }
    }
    if p.initiator != 0 && laneid() == 0 {
        // SAFETY: the host passes a device `u64` for the result.
        unsafe { st_global_u64(p.elapsed_ns as *mut u64, globaltimer() - t0) };
    }
}

/// Put bandwidth: block `b` of `n` puts its 256-byte-aligned slice of `bytes` to the peer
/// (the last block also the remainder), `iters` times, then waits for every put to complete.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn nvshmem_put_bw(p: NvshmemPutParams) {
    let (b, n) = (ctaid_x() as u64, nctaid_x() as u64);
    let chunk = p.bytes / n / 256 * 256;
    let lo = chunk * b;
    let hi = if b + 1 == n { p.bytes } else { lo + chunk };
    for _ in 0..p.iters {
        // SAFETY: `src` and `dst` are symmetric allocations of `bytes` bytes; the slice lies in them.
        unsafe { nvshmemx_putmem_nbi_block((p.dst + lo) as *mut c_void, (p.src + lo) as *const c_void, (hi - lo) as usize, p.peer) };
    }
    // SAFETY: completes this PE's puts.
    unsafe { nvshmem_quiet() };
}
