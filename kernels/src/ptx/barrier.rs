//! Block-level barriers.

use core::arch::asm;

/// `bar.sync 0;` (PTX 1.0, all sm): every thread of the block waits; orders shared and
/// global accesses among them. Every thread of the block must reach it.
#[inline(always)]
pub fn bar_sync_0() {
    // SAFETY: a barrier; the caller's control flow must be block-uniform, which every
    // kernel here guarantees by reaching it outside divergent branches.
    unsafe { asm!("bar.sync 0;", options(nostack)) };
}

/// `bar.sync id, n;` (PTX 2.0, sm_20): named barrier `id` (1..15) for `n` threads (a
/// multiple of 32). Use to sync a subset of warps (one role) without stalling the others.
#[inline(always)]
pub fn bar_sync(id: u32, n: u32) {
    // SAFETY: a barrier; callers pass the exact number of threads that reach it.
    unsafe { asm!("bar.sync {0}, {1};", in(reg32) id, in(reg32) n, options(nostack)) };
}

/// `bar.warp.sync mask;` (PTX 6.0, sm_70): lanes in `mask` converge and order their memory
/// accesses. Use before one lane publishes what the warp wrote.
#[inline(always)]
pub fn bar_warp_sync(mask: u32) {
    // SAFETY: every lane in `mask` executes it (callers pass the active mask).
    unsafe { asm!("bar.warp.sync {0};", in(reg32) mask, options(nostack)) };
}

/// `bar.red.and.pred d, 0, p;` (PTX 2.0, sm_20): block barrier that also returns whether
/// `pred` held in every thread. Use where one thread's wait result must reach the block.
#[inline(always)]
pub fn bar_red_and_pred_0(pred: bool) -> bool {
    let d: u32;
    // SAFETY: a barrier; every thread of the block reaches it.
    unsafe {
        asm!("{{ .reg .pred p, q; setp.ne.u32 p, {1}, 0; bar.red.and.pred q, 0, p; selp.u32 {0}, 1, 0, q; }}",
            out(reg32) d, in(reg32) pred as u32, options(nostack))
    };
    d != 0
}
