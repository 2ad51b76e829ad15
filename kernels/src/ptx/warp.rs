//! Warp-level data exchange and votes. All take `membermask`; every lane named in it must
//! execute the instruction.

use core::arch::asm;

/// `shfl.sync.idx.b32 d, a, src, 0x1f, mask;` (PTX 6.0, sm_70): value of `a` in lane `src`.
#[inline(always)]
pub fn shfl_sync_idx_b32(mask: u32, a: u32, src: u32) -> u32 {
    let d: u32;
    // SAFETY: register exchange among converged lanes of `mask`.
    unsafe { asm!("shfl.sync.idx.b32 {0}, {1}, {2}, 0x1f, {3};", out(reg32) d, in(reg32) a, in(reg32) src, in(reg32) mask, options(nomem, nostack)) };
    d
}

/// `shfl.sync.bfly.b32 d, a, lanemask, 0x1f, mask;` (PTX 6.0, sm_70): value of `a` in lane
/// `laneid ^ lanemask`. Use for butterfly reductions.
#[inline(always)]
pub fn shfl_sync_bfly_b32(mask: u32, a: u32, lanemask: u32) -> u32 {
    let d: u32;
    // SAFETY: register exchange among converged lanes of `mask`.
    unsafe {
        asm!("shfl.sync.bfly.b32 {0}, {1}, {2}, 0x1f, {3};", out(reg32) d, in(reg32) a, in(reg32) lanemask, in(reg32) mask, options(nomem, nostack))
    };
    d
}

/// `shfl.sync.up.b32 d, a, delta, 0, mask;` (PTX 6.0, sm_70): value of `a` in lane
/// `laneid - delta` (own value for lower lanes). Use for warp prefix sums.
#[inline(always)]
pub fn shfl_sync_up_b32(mask: u32, a: u32, delta: u32) -> u32 {
    let d: u32;
    // SAFETY: register exchange among converged lanes of `mask`.
    unsafe { asm!("shfl.sync.up.b32 {0}, {1}, {2}, 0, {3};", out(reg32) d, in(reg32) a, in(reg32) delta, in(reg32) mask, options(nomem, nostack)) };
    d
}

/// `vote.sync.ballot.b32 d, p, mask;` (PTX 6.0, sm_70): bit `i` set when lane `i` passes
/// `true`.
#[inline(always)]
pub fn vote_sync_ballot_b32(mask: u32, pred: bool) -> u32 {
    let d: u32;
    // SAFETY: register vote among converged lanes of `mask`.
    unsafe {
        asm!("{{ .reg .pred p; setp.ne.u32 p, {1}, 0; vote.sync.ballot.b32 {0}, p, {2}; }}",
            out(reg32) d, in(reg32) pred as u32, in(reg32) mask, options(nomem, nostack))
    };
    d
}

/// `vote.sync.any.pred d, p, mask;` (PTX 6.0, sm_70): true when any lane passes `true`.
#[inline(always)]
pub fn vote_sync_any_pred(mask: u32, pred: bool) -> bool {
    let d: u32;
    // SAFETY: register vote among converged lanes of `mask`.
    unsafe {
        asm!("{{ .reg .pred p, q; setp.ne.u32 p, {1}, 0; vote.sync.any.pred q, p, {2}; selp.u32 {0}, 1, 0, q; }}",
            out(reg32) d, in(reg32) pred as u32, in(reg32) mask, options(nomem, nostack))
    };
    d != 0
}

/// `elect.sync _|p, mask;` (PTX 8.0, sm_90): true in exactly one lane of `mask`. Use to pick
/// the lane that issues a bulk copy or publishes a flag.
#[inline(always)]
pub fn elect_sync(mask: u32) -> bool {
    let d: u32;
    // SAFETY: register vote among converged lanes of `mask`.
    unsafe {
        asm!("{{ .reg .pred p; elect.sync _|p, {1}; selp.u32 {0}, 1, 0, p; }}",
            out(reg32) d, in(reg32) mask, options(nomem, nostack))
    };
    d != 0
}
