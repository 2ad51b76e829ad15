//! Hopper bulk copies (`cp.async.bulk`) and the `mbarrier`s that track them.
//!
//! Global -> shared copies complete on an mbarrier (`complete_tx::bytes`); shared -> global
//! copies complete in bulk groups. Shared memory written by ordinary stores must be fenced
//! with [`super::fence_proxy_async_shared_cta`] before a bulk copy reads it; a bulk store
//! whose bytes a flag publishes needs `cp.async.bulk.wait_group 0` ([`cp_async_bulk_wait_group`]) and
//! [`super::fence_proxy_async_global`] before the flag.

use core::arch::asm;

/// `mbarrier.init.shared::cta.b64 [a], count;` (PTX 7.0, sm_80): initialise an mbarrier
/// expecting `count` arrivals per phase.
///
/// # Safety
/// `a` must be an 8-byte aligned shared address not in use by another mbarrier phase.
#[inline(always)]
pub unsafe fn mbarrier_init_shared_cta_b64(a: u32, count: u32) {
    // SAFETY: the caller guarantees `a` is valid shared memory.
    unsafe { asm!("mbarrier.init.shared::cta.b64 [{0}], {1};", in(reg32) a, in(reg32) count, options(nostack)) };
}

/// `mbarrier.arrive.expect_tx.shared::cta.b64 state, [a], tx;` (PTX 8.0, sm_90): arrive and
/// announce `tx` bytes that bulk copies will complete on this barrier.
///
/// # Safety
/// `a` must be an initialised mbarrier in shared memory.
#[inline(always)]
pub unsafe fn mbarrier_arrive_expect_tx_shared_cta_b64(a: u32, tx: u32) -> u64 {
    let state: u64;
    // SAFETY: the caller guarantees `a` is an initialised mbarrier.
    unsafe {
        asm!("mbarrier.arrive.expect_tx.shared::cta.b64 {0}, [{1}], {2};",
            out(reg64) state, in(reg32) a, in(reg32) tx, options(nostack))
    };
    state
}

/// `mbarrier.try_wait.parity.shared::cta.b64 p, [a], parity;` (PTX 7.8, sm_90): true once the
/// phase with `parity` has completed (the hardware may suspend the thread for a while).
///
/// # Safety
/// `a` must be an initialised mbarrier in shared memory.
#[inline(always)]
pub unsafe fn mbarrier_try_wait_parity_shared_cta_b64(a: u32, parity: u32) -> bool {
    let done: u32;
    // SAFETY: the caller guarantees `a` is an initialised mbarrier.
    unsafe {
        asm!("{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{1}], {2}; selp.u32 {0}, 1, 0, p; }}",
            out(reg32) done, in(reg32) a, in(reg32) parity, options(nostack))
    };
    done != 0
}

/// `cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [src], n, [mbar];`
/// (PTX 8.0, sm_90): copy `n` bytes (multiple of 16, both addresses 16-byte aligned) from
/// global memory into shared memory; completion counts `n` bytes on `mbar`.
///
/// # Safety
/// `src` must be valid global memory, `dst` and `mbar` valid shared addresses of this block,
/// and nothing may touch `dst` until the mbarrier phase completes.
#[inline(always)]
pub unsafe fn cp_async_bulk_shared_cluster_global_mbarrier_complete_tx_bytes(dst: u32, src: *const u8, n: u32, mbar: u32) {
    // SAFETY: the caller guarantees the addresses and the size.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {1}; cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [{0}], [g], {2}, [{3}]; }}",
            in(reg32) dst, in(reg64) src, in(reg32) n, in(reg32) mbar, options(nostack))
    };
}

/// `cp.async.bulk.global.shared::cta.bulk_group [dst], [src], n;` (PTX 8.0, sm_90): copy `n`
/// bytes (multiple of 16, 16-byte aligned) from shared memory to global memory, which may be
/// a peer GPU's memory mapped over NVLink. Completes in the current bulk group.
///
/// # Safety
/// `dst` must be valid global memory and `src` a valid shared address written before a
/// [`super::fence_proxy_async_shared_cta`]; `src` must stay unchanged until
/// [`cp_async_bulk_wait_group_read`].
#[inline(always)]
pub unsafe fn cp_async_bulk_global_shared_cta_bulk_group(dst: *mut u8, src: u32, n: u32) {
    // SAFETY: the caller guarantees the addresses and the size.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {0}; cp.async.bulk.global.shared::cta.bulk_group [g], [{1}], {2}; }}",
            in(reg64) dst, in(reg32) src, in(reg32) n, options(nostack))
    };
}

/// `cp.async.bulk.commit_group;` (PTX 8.0, sm_90): closes the current bulk group.
#[inline(always)]
pub fn cp_async_bulk_commit_group() {
    // SAFETY: bookkeeping of this thread's bulk copies.
    unsafe { asm!("cp.async.bulk.commit_group;", options(nostack)) };
}

/// `cp.async.bulk.wait_group.read N;` (PTX 8.0, sm_90): waits until at most `N` committed bulk
/// groups still read their source, so older shared buffers may be rewritten.
#[inline(always)]
pub fn cp_async_bulk_wait_group_read<const N: u32>() {
    // SAFETY: waits on this thread's bulk copies.
    unsafe { asm!("cp.async.bulk.wait_group.read {n};", n = const N, options(nostack)) };
}

/// `cp.async.bulk.wait_group N;` (PTX 8.0, sm_90): waits until at most `N` committed bulk
/// groups are pending: every older group has completed (its writes performed). `N = 0`
/// before publishing what all the copies wrote.
#[inline(always)]
pub fn cp_async_bulk_wait_group<const N: u32>() {
    // SAFETY: waits on this thread's bulk copies.
    unsafe { asm!("cp.async.bulk.wait_group {n};", n = const N, options(nostack)) };
}
