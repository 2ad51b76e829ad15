//! Cross-rank barrier over the symmetric heap, and block-completion counters.

use super::Waiter;
use crate::abi::{Control, MAX_RANKS, Peers, phase};
use crate::dev::peer_base;
use crate::ptx::{
    atom_acq_rel_gpu_global_add_u32, bar_red_and_pred_0, bar_sync_0, fence_acq_rel_sys, nctaid_x, ntid_x, red_relaxed_sys_global_add_u32,
    st_relaxed_sys_global_u32, st_release_sys_global_u32, tid_x,
};
use crate::remote::rank_base;

/// The heap's control block on rank `r`.
#[inline(always)]
pub fn control(peers: &Peers, r: u32) -> *mut Control {
    peer_base(peers, r) as *mut Control
}

/// Word `i` of a per-rank array of the control block (`i` is a rank; it is taken modulo
/// `MAX_RANKS`, so no value reaches outside the array, and no bounds check can `trap`).
#[inline(always)]
pub fn rank_slot(a: *mut [u32; MAX_RANKS], i: u32) -> *mut u32 {
    a.cast::<u32>().wrapping_add(i as usize % MAX_RANKS)
}

/// Word `[h][i]` of a per-half, per-rank array of the control block (`h` modulo 2, `i` modulo
/// `MAX_RANKS`; see [`rank_slot`]).
#[inline(always)]
pub fn half_rank_slot(a: *mut [[u32; MAX_RANKS]; 2], h: u32, i: u32) -> *mut u32 {
    a.cast::<u32>().wrapping_add(h as usize % 2 * MAX_RANKS + i as usize % MAX_RANKS)
}

/// Word `h` of a per-half array of the control block (`h` modulo 2; see [`rank_slot`]).
#[inline(always)]
pub fn half_slot(a: *mut [u32; 2], h: u32) -> *mut u32 {
    a.cast::<u32>().wrapping_add(h as usize % 2)
}

/// Cross-rank barrier run by one whole block (thread `t` serves ranks `t`, `t + blockDim`, ...).
/// Every write the block (and earlier kernels on this stream) made is visible to every peer
/// afterwards, and every peer's writes before its barrier are visible here. Epochs live in the
/// heap (this rank's in its [`Control`], the peers' arrivals in its [`crate::abi::HeapTables`]
/// slots at `slots`), so graph replays keep counting. Returns false if a peer did not arrive in
/// time (reported).
///
/// # Safety
/// `ranks` must be the heap's rank table with an entry for every rank and no put rank, `slots`
/// the heap offset of its barrier slots; all threads of the block must call it.
pub unsafe fn barrier_block(ranks: u64, slots: u64, w: &Waiter) -> bool {
    let tid = tid_x();
    // SAFETY: the caller's contract: an entry per rank.
    let base = |r: u32| unsafe { rank_base(ranks, r) };
    let me = base(w.rank) as *mut Control;
    // SAFETY: the control block is valid heap memory; only this block writes `barrier_epoch`,
    // and every thread reads it before thread 0 rewrites it (the barrier between).
    let epoch = unsafe { core::ptr::read_volatile(&raw const (*me).barrier_epoch) }.wrapping_add(1);
    bar_sync_0();
    if tid == 0 {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*me).barrier_epoch, epoch) };
    }
    // Slot `s` of rank `r`'s heap (`s` < world: the slots hold an entry per rank).
    let slot = |r: u32, s: u32| (base(r) + slots + 4 * s as u64) as *mut u32;
    if tid < w.world {
        fence_acq_rel_sys();
    }
    let mut r = tid;
    while r < w.world {
        // SAFETY: every rank's slots are valid mapped heap memory.
        unsafe { st_release_sys_global_u32(slot(r, w.rank), epoch) };
        r += ntid_x();
    }
    let mut ok = true;
    let mut s = tid;
    while ok && s < w.world {
        // SAFETY: this rank's own slots.
        ok = unsafe { w.wait_reached(slot(w.rank, s), epoch, phase::BARRIER, s) };
        s += ntid_x();
    }
    bar_red_and_pred_0(ok)
}

/// Signals "this block's writes to every rank have landed": after a block barrier, thread 0
/// fences once at `.sys` scope and adds 1 to `counter(rank)` on every rank with relaxed
/// reductions (fence + relaxed atomic is a release; one fence for all ranks instead of a
/// release, which drains the NVLink writes again, per rank). Threads that issued bulk stores
/// must have waited for them (`cp.async.bulk.wait_group 0`) and fenced the async proxy
/// (`fence.proxy.async.global`) before calling.
///
/// # Safety
/// `counter(r)` must give a valid u32 in rank `r`'s heap; all threads of the block must call it.
#[inline(always)]
pub unsafe fn signal_all_ranks(w: &Waiter, counter: impl Fn(u32) -> *mut u32) {
    bar_sync_0();
    if tid_x() == 0 {
        fence_acq_rel_sys();
        for r in 0..w.world {
            // SAFETY: the caller guarantees the counter addresses.
            unsafe { red_relaxed_sys_global_add_u32(counter(r), 1) };
        }
    }
}

/// Waits (thread `s % blockDim` of the block for source `s`) until `counter(src)` reaches
/// `expected`, then block-syncs. Returns, in every thread, false if some source fell short
/// (reported).
///
/// # Safety
/// `counter(s)` must give a valid u32 in this rank's heap; all threads must call it.
#[inline(always)]
pub unsafe fn wait_all_sources(w: &Waiter, counter: impl Fn(u32) -> *const u32, expected: u32, phase: u32) -> bool {
    let mut ok = true;
    let mut s = tid_x();
    while ok && s < w.world {
        // SAFETY: the caller guarantees the counter addresses.
        ok = unsafe { w.wait_eq(counter(s), expected, phase, s) };
        s += ntid_x();
    }
    bar_red_and_pred_0(ok)
}

/// [`wait_all_sources`] for epochs: waits until `counter(src)` has reached `expected`
/// (wrapping comparison, so a source already past it counts).
///
/// # Safety
/// As [`wait_all_sources`].
#[inline(always)]
pub unsafe fn wait_all_sources_reached(w: &Waiter, counter: impl Fn(u32) -> *const u32, expected: u32, phase: u32) -> bool {
    let mut ok = true;
    let mut s = tid_x();
    while ok && s < w.world {
        // SAFETY: the caller guarantees the counter addresses.
        ok = unsafe { w.wait_reached(counter(s), expected, phase, s) };
        s += ntid_x();
    }
    bar_red_and_pred_0(ok)
}

/// Last-block detection for self-cleaning counters: returns true in thread 0 of the last
/// block of the grid to call it (and resets `done` to 0 there).
///
/// # Safety
/// `done` must be a valid u32 of this GPU's memory used only by this kernel; all threads of
/// every block must call it once.
#[inline(always)]
pub unsafe fn last_block_done(done: *mut u32) -> bool {
    bar_sync_0();
    if tid_x() != 0 {
        return false;
    }
    // SAFETY: the caller guarantees `done`.
    let prev = unsafe { atom_acq_rel_gpu_global_add_u32(done, 1) };
    if prev + 1 == nctaid_x() {
        // SAFETY: every block has arrived; nobody else touches `done` in this launch.
        unsafe { st_relaxed_sys_global_u32(done, 0) };
        true
    } else {
        false
    }
}

/// [`last_block_done`] for the whole block: every thread of the grid's last block to call it
/// gets true (and `done` is reset), every other thread false.
///
/// # Safety
/// As [`last_block_done`].
#[inline(always)]
pub unsafe fn last_block_of_grid(done: *mut u32) -> bool {
    // SAFETY: forwarded.
    let last = unsafe { last_block_done(done) };
    bar_red_and_pred_0(tid_x() != 0 || last)
}
