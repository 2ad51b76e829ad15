//! Low-latency (decode) kernels: no count exchange, fixed addresses.
//!
//! Dispatch sends each token **once per destination rank**, whatever the number of that
//! rank's experts it picked: the FP8 cast happens once, in registers, and the row lands in
//! slot `[source][token]` of the destination's `tok_x`, with a routing row (the local expert
//! of each top-k slot, and the weights) beside it. Every block then adds 1 to each rank's
//! arrival counter with a `.sys` release. The receive half waits for every source's blocks and
//! places each received token into every local expert's packed rows (`recv_x[expert][slot]`,
//! slots taken with this GPU's own atomics), so users see per-expert packed rows, counts and
//! source info, as before.
//!
//! Before a sender writes into a peer's half for the `n`-th time, it waits until that peer has
//! started its own `n`-th dispatch on the half (`free`), which ends the peer's views of the
//! half's previous dispatch: three dispatches without a combine can no longer overwrite rows a
//! peer is still reading.
//!
//! Combine has two modes ([`combine_mode`]):
//! - **per expert** (exact): each received row goes back to slot `[token][k]` of its home; the
//!   home sums `w_k * y_k` in f32 over k in order (fused multiply-add), rounds once.
//! - **pre-reduced**: each expert rank sums `w_k * y_k` over its own slots of a token (f32,
//!   slot order, fused multiply-add), rounds to bf16 and sends one row per (token, rank) to
//!   slot `[token][k]`, `k` the token's first top-k slot on that rank; the home adds those rows
//!   in rank order (f32) and rounds.
//!
//! Every rank count up to [`crate::abi::LL_MAX_RANKS`] takes the same code: addresses come
//! from the buffer's rank table, the per-rank flags and counters from its rank tables
//! ([`LlRankTables`]), a token's destinations are a list of at most top-k ranks, and the
//! per-source prefix is a block scan.
//!
//! Halves alternate per call on the host, so a call's receive half cleans what the next call
//! of the same half needs; see `docs/protocol.md` for the ordering argument.

use crate::abi::{
    Control, FP8_GROUP, LL_DEST_WORDS, LlCombineParams, LlDispatchParams, LlRankTables, MAX_HIDDEN, MAX_TOPK, bad_index, combine_mode, ll_scale_rows,
    phase, scale_fmt, scale_layout, stage, status, trace,
};
use crate::dev::{
    FULL, accumulate_rows_in_order, block_exclusive_scan_u32, div_ceil_u32, div_rem_u32, div_rem_u64, grid_warp_interleaved, group_max_f32,
    load_topk_idx, pack_bf16x8, shfl_idx_u64, unpack_bf16x2, warp_copy_to_lane_dests,
};
use crate::fp::fp8_scale;
use crate::ptx::{
    abs_f32, atom_relaxed_gpu_global_add_u32, bar_red_and_pred_0, bar_sync_0, ctaid_x, cvt_rn_satfinite_e4m3x2_f32, dyn_smem_base, fence_acq_rel_sys,
    fma_rn_f32, globaltimer, laneid, ld_global_nc_L1_no_allocate_v4_u32, ld_global_nc_f32, ld_global_nc_s32, ld_global_nc_v4_u32, ld_global_u32,
    ld_global_v4_u32, ld_relaxed_sys_global_u32, ld_shared_cta_u32, max_f32, mul_rn_f32, nctaid_x, ntid_x, red_relaxed_gpu_global_add_s32,
    shfl_sync_idx_b32, st_global_L1_no_allocate_v4_u32, st_global_u8, st_global_u32, st_global_u64, st_global_v4_u32, st_relaxed_sys_global_u32,
    st_shared_cta_u32, tid_x, vote_sync_any_pred, vote_sync_ballot_b32,
};
use crate::remote::Remote;
use crate::sync::{Waiter, half_slot, last_block_done, last_block_of_grid, wait_all_sources, wait_all_sources_reached};

/// Vectors in flight per lane in the BF16 row copies and the combine reduction.
const UNROLL: usize = 4;
/// Vectors per work unit (one warp) of the combine halves.
const CHUNK: u32 = 32 * UNROLL as u32;
/// Vectors in flight per lane when the receive half copies a token into expert rows.
const RECV_UNROLL: usize = 8;
/// Tokens a block loads at once in the send half (their loads overlap).
const SEND_BATCH: u32 = 2;
/// "No local expert" in a routing row.
const NO_EXPERT: u32 = 0xffff;

/// Word `[h][r]` of the per-half, per-rank table at heap offset `table` (one of
/// [`LlRankTables`]) of the heap at `base`.
#[inline(always)]
fn rank_word(base: u64, table: u64, world: u32, h: u32, r: u32) -> *mut u32 {
    (base + LlRankTables::slot(table, world, h, r)) as *mut u32
}

/// The control block of the heap at `base`.
#[inline(always)]
fn control_at(base: u64) -> *mut Control {
    base as *mut Control
}

/// Send half (every block) and receive half (every block), as `stages` says.
/// Dynamic shared memory: [`ll_dispatch_smem_bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ll_dispatch(p: LlDispatchParams) {
    let w = Waiter::new(&p.wait);
    // SAFETY: the host passes 0 or a table sized for this grid (`LlBuffer::trace_addr`).
    unsafe { mark(p.trace, trace::START) };
    let (world, rank) = (w.world, w.rank);
    let h = p.half;
    let tb = p.layout.tables;
    // SAFETY: shapes validated by the host; heap offsets from the buffer's layout; the rank
    // table holds every rank's entry (`LlBuffer`).
    unsafe {
        let remote = Remote::new(p.ranks, p.any_put);
        let own = remote.base(rank);
        let me = control_at(own);
        // This dispatch's number on this half; the last receive block stores it at the end, so
        // every block reads the same value here.
        let seq = core::ptr::read_volatile(half_slot(&raw mut (*me).ll_dispatch_seq, h)).wrapping_add(1);
        if p.stages & stage::SEND != 0 {
            if ctaid_x() == 0 {
                // This rank's views of the half's previous dispatch are dead (that kernel and
                // every earlier one on the stream have ended): peers may write the half.
                let mut d = tid_x();
                while d < world {
                    remote.st_relaxed_sys_u32(d, rank_word(remote.base(d), tb.free, world, h, rank), seq);
                    d += ntid_x();
                }
            }
            // Each sending lane waits for its destination's flag right before its first store
            // there (overlapping the wait with the loads). A peer that never frees its half is
            // reported; nothing more is sent or signalled then, so the peers time out too
            // instead of reading stale rows.
            if dispatch_send(&p, &w, &remote, seq) {
                mark(p.trace, trace::SENT);
                remote.signal_all_ranks(&w, |r| rank_word(remote.base(r), tb.dispatch_arrive, world, h, rank));
                mark(p.trace, trace::SIGNALLED);
            }
        }
        if p.stages & stage::RECV != 0 {
            // At least this dispatch's blocks of every source: a block of a source's next
            // dispatch on the half that sends this rank nothing signals without waiting for this
            // rank's flag, so with two dispatches pending its arrival may already be counted
            // (a source's arrivals come in dispatch order; the rows stay guarded by the flag).
            let ok = wait_all_sources_reached(&w, |s| rank_word(own, tb.dispatch_arrive, world, h, s), p.send_blocks, phase::LL_DISPATCH_RECV);
            mark(p.trace, trace::ARRIVED);
            if ok {
                dispatch_recv(&p, &w, own);
            }
            let last = last_block_of_grid(half_slot(&raw mut (*me).ll_dispatch_done, h));
            mark(p.trace, trace::DONE);
            if last {
                finish_dispatch(&p, &w, &remote, ok, seq);
            }
        }
        mark(p.trace, trace::END);
    }
}

/// Stamps mark `m` of this block's trace row with `%globaltimer` (thread 0; nothing when
/// `trace` is 0). See [`trace`].
///
/// # Safety
/// `trace` must be 0 or a device table `u64 [grid blocks][trace::MARKS]`, and `m < MARKS`.
#[inline(always)]
unsafe fn mark(trace: u64, m: usize) {
    if trace != 0 && tid_x() == 0 {
        // SAFETY: the caller guarantees the table's size.
        unsafe { st_global_u64((trace + (ctaid_x() as u64 * trace::MARKS as u64 + m as u64) * 8) as *mut u64, globaltimer()) };
    }
}

/// The last receive block: publishes the per-expert counts, cleans the counters for the next
/// dispatch of this half and stores its sequence number.
unsafe fn finish_dispatch(p: &LlDispatchParams, w: &Waiter, remote: &Remote, ok: bool, seq: u32) {
    let (world, rank) = (w.world, w.rank);
    let h = p.half;
    let rows_per_expert = world * p.max_tokens;
    // SAFETY: as in `ll_dispatch`; every block of the grid has finished its receive work.
    unsafe {
        let own = remote.base(rank);
        let me = control_at(own);
        let hb = own + p.half_off;
        let mut j = tid_x();
        while j < p.experts_per_rank {
            let counter = (hb + p.layout.slot_counter + 4 * j as u64) as *mut u32;
            let c = core::cmp::min(ld_relaxed_sys_global_u32(counter), rows_per_expert);
            st_global_u32((hb + p.layout.recv_count + 4 * j as u64) as *mut u32, c);
            if p.stats != 0 {
                red_relaxed_gpu_global_add_s32((p.stats as *mut i32).add(j as usize), c as i32);
            }
            st_relaxed_sys_global_u32(counter, 0);
            j += ntid_x();
        }
        let mut s = tid_x();
        while ok && s < world {
            // Takes this dispatch's arrivals away, keeping any of the next one's (which may be
            // landing now: a put source's adds are NVSHMEM atomics, so this one is too).
            remote.own_counter_add(s, rank, rank_word(own, p.layout.tables.dispatch_arrive, world, h, s), p.send_blocks.wrapping_neg());
            s += ntid_x();
        }
        if tid_x() == 0 {
            core::ptr::write_volatile(half_slot(&raw mut (*me).ll_dispatch_seq, h), seq);
        }
    }
}

/// Each block takes a contiguous share of the tokens, `warps` at a time. Phase 1: warp `w`
/// routes token `base + w`: which ranks get it (a list of at most `MAX_TOPK` in shared memory),
/// and every rank's routing row (its local expert per top-k slot, and the weights). Phase 2: the
/// block streams those tokens, each thread 16 channels (8 threads form a 128-channel FP8
/// group), cast once and stored to every rank that needs the token, `SEND_BATCH` tokens' loads
/// in flight at a time.
unsafe fn dispatch_send(p: &LlDispatchParams, w: &Waiter, remote: &Remote, seq: u32) -> bool {
    let (tid, nt) = (tid_x(), ntid_x());
    let (warp, warps) = (tid / 32, nt / 32);
    let (world, rank) = (w.world, w.rank);
    let k = p.k;
    let epr = p.experts_per_rank as i64;
    let num_experts = epr * world as i64;
    let is64 = p.idx_i64 != 0;
    let dests = dyn_smem_base();
    let first = rank as u64 * p.max_tokens as u64;
    let per_block = div_ceil_u32(p.num_tokens, nctaid_x());
    let t0 = core::cmp::min(ctaid_x() * per_block, p.num_tokens);
    let t1 = core::cmp::min(t0 + per_block, p.num_tokens);
    let guard = p.stages & stage::NO_REUSE_GUARD == 0;
    // SAFETY: this rank is below the launch's rank count.
    let own = unsafe { remote.base(rank) };
    // SAFETY: as in `ll_dispatch`; shared memory holds `LL_DEST_WORDS` words per warp.
    unsafe {
        let mut ok = true;
        if ctaid_x() == 0 {
            // How many routing rows this rank writes to every rank.
            let mut d = tid;
            while ok && d < world {
                ok = !guard || w.wait_reached(rank_word(own, p.layout.tables.free, world, p.half, d), seq, phase::LL_DISPATCH_SEND, d);
                if ok {
                    let hb = remote.base(d) + p.half_off;
                    remote.st_u32(d, (hb + p.layout.src_ntok + 4 * rank as u64) as *mut u32, p.num_tokens);
                }
                d += nt;
            }
        }
        if !bar_red_and_pred_0(ok) {
            return false;
        }
        let mut base = t0;
        while base < t1 {
            let t = base + warp;
            let mut ok = true;
            if t < t1 {
                ok = route_token(p, w, remote, t, first + t as u64, num_experts, epr, is64, k, seq, guard, dests + 4 * LL_DEST_WORDS * warp);
            }
            // Every warp with a token waited for every rank's flag: the block may store.
            if !bar_red_and_pred_0(ok) {
                return false;
            }
            let count = core::cmp::min(warps, t1 - base);
            let mut i = 0;
            while i < count {
                stream_tokens(p, remote, base + i, core::cmp::min(SEND_BATCH, count - i), first, dests + 4 * LL_DEST_WORDS * i);
                i += SEND_BATCH;
            }
            if remote.any() {
                // The rows staged in this rank's own slots are complete for the NIC too.
                fence_acq_rel_sys();
            }
            bar_sync_0();
            if remote.any() && warp < count {
                put_token(p, remote, first + (base + warp) as u64, dests + 4 * LL_DEST_WORDS * warp);
            }
            base += warps;
        }
        true
    }
}

/// Phase 1 for token `t` (one warp): writes the token's routing row (and weights) to every
/// rank, rank `d` by lane `d % 32` after waiting until rank `d` has freed its half for dispatch
/// `seq` (unless `guard` is off); leaves at `dests` the number of ranks that hold one of its
/// experts, then those ranks (in top-k order of their first slot), and returns whether every
/// wait succeeded.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn route_token(
    p: &LlDispatchParams,
    w: &Waiter,
    remote: &Remote,
    t: u32,
    slot: u64,
    num_experts: i64,
    epr: i64,
    is64: bool,
    k: u32,
    seq: u32,
    guard: bool,
    dests: u32,
) -> bool {
    let lane = laneid();
    let world = w.world;
    // SAFETY: the host validated `topk_idx` (and `topk_weights`) as [N, k]; `dests` holds
    // `LL_DEST_WORDS` words of shared memory.
    unsafe {
        let i = t as usize * k as usize + lane as usize;
        let e = if lane < k { load_topk_idx(p.topk_idx, i, is64) } else { -1 };
        let wt = if lane < k && p.topk_weights != 0 { ld_global_nc_f32((p.topk_weights as *const f32).add(i)) } else { 0.0 };
        if lane < k && (e < -1 || e >= num_experts) {
            w.report(status::BAD_EXPERT, phase::LL_DISPATCH_SEND, t, num_experts as u64, e as u64, 0);
        }
        let valid = lane < k && e >= 0 && e < num_experts;
        let (dest, local) = if valid {
            let (d, l) = div_rem_u64(e as u64, epr as u64);
            (d as u32, l as u32)
        } else {
            (u32::MAX, NO_EXPERT)
        };
        // The token's destination ranks, each once: a slot whose rank no earlier slot has.
        let first = first_of_its_value(dest) && valid;
        let firsts = vote_sync_ballot_b32(FULL, first);
        if first {
            st_shared_cta_u32(dests + 4 * (1 + (firsts & lanes_below(lane)).count_ones()), dest);
        }
        if lane == 0 {
            st_shared_cta_u32(dests, firsts.count_ones());
        }
        let wbits = wt.to_bits();
        let mut ok = true;
        // Rank d's row by lane d % 32, 32 ranks a pass (every lane runs every pass: the rows
        // are built with shuffles).
        for pass in 0..div_ceil_u32(world, 32) {
            let d = 32 * pass + lane;
            // Slot j holds the local expert when slot j's expert lives on rank d. Written out
            // slot by slot so the row stays in registers (a loop here is not unrolled, and its
            // arrays would go to local memory).
            let entry = |j: u32| -> (u32, u32) {
                let dj = shfl_sync_idx_b32(FULL, dest, j);
                let lj = shfl_sync_idx_b32(FULL, local, j);
                let wj = shfl_sync_idx_b32(FULL, wbits, j);
                if dj == d { (lj, wj) } else { (NO_EXPERT, 0) }
            };
            let e = [
                entry(0),
                entry(1),
                entry(2),
                entry(3),
                entry(4),
                entry(5),
                entry(6),
                entry(7),
                entry(8),
                entry(9),
                entry(10),
                entry(11),
                entry(12),
                entry(13),
                entry(14),
                entry(15),
            ];
            const _: () = assert!(MAX_TOPK == 16);
            let pair = |q: usize| e[2 * q].0 | e[2 * q + 1].0 << 16;
            let route = [pair(0), pair(1), pair(2), pair(3), pair(4), pair(5), pair(6), pair(7)];
            let hit = e.iter().any(|x| x.0 != NO_EXPERT);
            let wts = |q: usize| [e[4 * q].1, e[4 * q + 1].1, e[4 * q + 2].1, e[4 * q + 3].1];
            if d < world && guard && ok {
                ok = w.wait_reached(rank_word(remote.base(w.rank), p.layout.tables.free, world, p.half, d), seq, phase::LL_DISPATCH_SEND, d);
            }
            if d < world && ok {
                let hb = remote.base(d) + p.half_off;
                let r = (hb + p.layout.tok_route + slot * 2 * MAX_TOPK as u64) as *mut [u32; 4];
                remote.st_v4_u32(d, r, [route[0], route[1], route[2], route[3]]);
                remote.st_v4_u32(d, r.add(1), [route[4], route[5], route[6], route[7]]);
                if hit && p.topk_weights != 0 {
                    let wr = (hb + p.layout.tok_w + slot * 4 * MAX_TOPK as u64) as *mut [u32; 4];
                    remote.st_v4_u32(d, wr, wts(0));
                    remote.st_v4_u32(d, wr.add(1), wts(1));
                    remote.st_v4_u32(d, wr.add(2), wts(2));
                    remote.st_v4_u32(d, wr.add(3), wts(3));
                }
            }
        }
        !vote_sync_any_pred(FULL, !ok)
    }
}

/// Whether no lane below this one holds `v` among the first `MAX_TOPK` lanes. A warp
/// collective: every lane must call it, so call it before (never behind) a lane's own
/// condition (`first_of_its_value(v) && valid`, not `valid && ...`, which `&&` would skip).
#[inline(always)]
fn first_of_its_value(v: u32) -> bool {
    let lane = laneid();
    let mut first = true;
    for j in 0..MAX_TOPK as u32 {
        let vj = shfl_sync_idx_b32(FULL, v, j);
        if j < lane && vj == v {
            first = false;
        }
    }
    first
}

/// Bits of the lanes below `lane`.
#[inline(always)]
fn lanes_below(lane: u32) -> u32 {
    if lane == 0 { 0 } else { FULL >> (32 - lane) }
}

/// Phase 2 for tokens `t..t + n` (the whole block): each thread loads 16 channels of every
/// token first, then casts and stores them to every rank in the token's destination list
/// (`dests`: `LL_DEST_WORDS` words per token in shared memory, from [`route_token`]).
#[inline(always)]
unsafe fn stream_tokens(p: &LlDispatchParams, remote: &Remote, t: u32, n: u32, first: u64, dests: u32) {
    let (tid, nt) = (tid_x(), ntid_x());
    let fp8 = p.fp8 != 0;
    let hidden = p.hidden as u64;
    let n16 = p.hidden / 16;
    let groups = (p.hidden / FP8_GROUP as u32) as u64;
    let rank = p.wait.rank;
    // SAFETY: as in `ll_dispatch`.
    unsafe {
        // Every thread runs the same number of passes (the group maximum needs whole groups).
        let mut c = tid;
        for _ in 0..div_ceil_u32(n16, nt) {
            let active = c < n16;
            let load = |u: u32| -> [[u32; 4]; 2] {
                if active && u < n {
                    let src = (p.x + (t + u) as u64 * 2 * hidden) as *const [u32; 4];
                    [ld_global_nc_L1_no_allocate_v4_u32(src.add(2 * c as usize)), ld_global_nc_L1_no_allocate_v4_u32(src.add(2 * c as usize + 1))]
                } else {
                    [[0; 4]; 2]
                }
            };
            // Rank `d` of the token's list, as the rank whose memory the row is stored into:
            // a token for put ranks is stored once, into this rank's own slot (their table entry
            // is this rank's base), and sent from there by `put_token`. `None`: already stored.
            let target = |d: u32, own_done: &mut bool| -> Option<u32> {
                let d = if remote.put(d) { rank } else { d };
                if d == rank {
                    if *own_done {
                        return None;
                    }
                    *own_done = true;
                }
                Some(d)
            };
            let store = |u: u32, v: [[u32; 4]; 2]| {
                let list = dests + 4 * LL_DEST_WORDS * u;
                let nd = if u < n { ld_shared_cta_u32(list) } else { 0 };
                let slot = first + (t + u) as u64;
                let mut own_done = false;
                if fp8 {
                    // Every lane quantizes (the group maximum is a warp shuffle), even with no
                    // destination.
                    let (q, sc) = quantize_bf16x16(v, p.scale_fmt);
                    for i in 0..nd {
                        let Some(d) = target(ld_shared_cta_u32(list + 4 * (1 + i)), &mut own_done) else { continue };
                        if active {
                            let hb = remote.base(d) + p.half_off;
                            st_global_L1_no_allocate_v4_u32((hb + p.layout.tok_x + slot * 2 * hidden + 16 * c as u64) as *mut [u32; 4], q);
                            if c % 8 == 0 {
                                let g = (c / 8) as u64;
                                st_global_u32((hb + p.layout.tok_scales + (slot * groups + g) * 4) as *mut u32, sc.to_bits());
                            }
                        }
                    }
                } else if active {
                    for i in 0..nd {
                        let Some(d) = target(ld_shared_cta_u32(list + 4 * (1 + i)), &mut own_done) else { continue };
                        let hb = remote.base(d) + p.half_off;
                        let dst = (hb + p.layout.tok_x + slot * 2 * hidden + 32 * c as u64) as *mut [u32; 4];
                        st_global_L1_no_allocate_v4_u32(dst, v[0]);
                        st_global_L1_no_allocate_v4_u32(dst.add(1), v[1]);
                    }
                }
            };
            // All loads first (written out, so the values stay in registers), then the stores.
            const _: () = assert!(SEND_BATCH == 2);
            let (v0, v1) = (load(0), load(1));
            store(0, v0);
            store(1, v1);
            c += nt;
        }
    }
}

/// After a block's tokens are stored (and a barrier): the warp sends token `slot`'s row, and its
/// FP8 scales, from this rank's own slot to every put rank in its destination list (`dests`).
///
/// # Safety
/// As in `ll_dispatch`; every lane of the warp calls it with the same arguments.
#[inline(always)]
unsafe fn put_token(p: &LlDispatchParams, remote: &Remote, slot: u64, dests: u32) {
    let hidden = p.hidden as u64;
    // SAFETY: this rank is below the launch's rank count.
    let own = unsafe { remote.base(p.wait.rank) } + p.half_off;
    let row = own + p.layout.tok_x + slot * 2 * hidden;
    let groups = hidden / FP8_GROUP as u64;
    let scales = own + p.layout.tok_scales + slot * groups * 4;
    // SAFETY: the list was written by this warp before the block's barriers; the row (and
    // scales) lie in this rank's half, stored by the block before its barrier, with
    // `fence.acq_rel.sys`.
    unsafe {
        let nd = ld_shared_cta_u32(dests);
        for i in 0..nd {
            let d = ld_shared_cta_u32(dests + 4 * (1 + i));
            if !remote.put(d) {
                continue;
            }
            if p.fp8 != 0 {
                remote.put_warp(d, row, row, hidden);
                remote.put_warp(d, scales, scales, groups * 4);
            } else {
                remote.put_warp(d, row, row, 2 * hidden);
            }
        }
    }
}

/// Casts 16 bf16 channels to FP8 e4m3; the scale (returned as f32; a power of two for the
/// power-of-two formats) covers the 128 channels of the 8-lane group (every lane of the warp
/// must call it).
#[inline(always)]
fn quantize_bf16x16(v: [[u32; 4]; 2], fmt: u32) -> ([u32; 4], f32) {
    let mut f = [0f32; 16];
    let mut amax = 0f32;
    for i in 0..8 {
        let (a, b) = unpack_bf16x2(v[i / 4][i % 4]);
        f[2 * i] = a;
        f[2 * i + 1] = b;
        amax = max_f32(amax, max_f32(abs_f32(a), abs_f32(b)));
    }
    let sc = fp8_scale(group_max_f32(amax, 8), fmt);
    let mut q = [0u32; 4];
    for i in 0..8 {
        let pair = cvt_rn_satfinite_e4m3x2_f32(mul_rn_f32(f[2 * i + 1], sc.inv), mul_rn_f32(f[2 * i], sc.inv)) as u32;
        q[i / 2] |= pair << (16 * (i % 2));
    }
    (q, sc.scale)
}

/// Loads the `world` per-source token counts at `ntok` (with `load`) into shared memory as an
/// exclusive prefix (`world + 1` words at `prefix`, the last the total, then 32 words of scan
/// scratch) and returns the total. A count above `max` (the sources write them) is reported as
/// a bad index (`phase`) and taken as `max`. All threads must call it.
///
/// # Safety
/// `prefix` must be `world + 33` free words of shared memory; `ntok` must hold `world` counts.
#[inline(always)]
unsafe fn token_prefix(w: &Waiter, ntok: u64, max: u32, phase: u32, prefix: u32, load: unsafe fn(*const u32) -> u32) -> u32 {
    let (tid, nt, world) = (tid_x(), ntid_x(), w.world);
    // SAFETY: the caller guarantees both ranges.
    unsafe {
        let mut carry = 0u32;
        let mut s0 = 0u32;
        while s0 < world {
            let s = s0 + tid;
            let mut c = 0;
            if s < world {
                c = load((ntok as *const u32).add(s as usize));
                if !w.index_ok(c as u64, max as u64 + 1, bad_index::COUNT, phase, s) {
                    c = max;
                }
            }
            let (excl, total) = block_exclusive_scan_u32(c, prefix + 4 * (world + 1));
            if s < world {
                st_shared_cta_u32(prefix + 4 * s, carry + excl);
            }
            carry += total;
            s0 += nt;
        }
        if tid == 0 {
            st_shared_cta_u32(prefix + 4 * world, carry);
        }
        bar_sync_0();
        carry
    }
}

/// The `i`-th item of `n` groups, (group, index in it), from an exclusive prefix of the groups'
/// sizes in shared memory: the last group whose prefix is at most `i` (the received tokens in
/// source order from [`token_prefix`], or the received rows by local expert).
///
/// # Safety
/// `prefix` must hold such a prefix (`n` words, every block thread's writes to it behind a
/// barrier) and `i` be below the total.
#[inline(always)]
unsafe fn locate(prefix: u32, n: u32, i: u32) -> (u32, u32) {
    // SAFETY: the caller guarantees the prefix.
    unsafe {
        let (mut lo, mut hi) = (0u32, n);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if ld_shared_cta_u32(prefix + 4 * mid) <= i {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (lo, i - ld_shared_cta_u32(prefix + 4 * lo))
    }
}

/// Reads a u32 kernel input (never written while the kernel runs).
unsafe fn ld_input_u32(p: *const u32) -> u32 {
    // SAFETY: forwarded.
    unsafe { ld_global_nc_s32(p as *const i32) as u32 }
}

/// Receive half, one warp per received token: load its routing row, row and scales, take a
/// packed row in each local expert the token picked (this GPU's atomics), record where (for
/// combine) and who sent it, then store the row (and its scales, in the requested format and
/// layout) into every one of those rows.
unsafe fn dispatch_recv(p: &LlDispatchParams, w: &Waiter, own: u64) {
    let lane = laneid();
    let warps = ntid_x() / 32;
    let gw = grid_warp_interleaved();
    let total_warps = nctaid_x() * warps;
    let (world, rank) = (w.world, w.rank);
    let hb = own + p.half_off;
    let rows_pe = (world * p.max_tokens) as u64;
    let hidden = p.hidden as u64;
    let fp8 = p.fp8 != 0;
    let row_bytes = if fp8 { hidden } else { 2 * hidden };
    let nvec = (row_bytes / 16) as u32;
    let groups = p.hidden / FP8_GROUP as u32;
    let scale_rows = ll_scale_rows(world as u64, p.max_tokens as u64);
    let ue8m0 = p.scale_fmt == scale_fmt::UE8M0;
    let prefix = dyn_smem_base();
    // SAFETY: as in `ll_dispatch`; every source's rows were acquired before (arrival counters);
    // shared memory holds `world + 33` words.
    unsafe {
        let total = token_prefix(w, hb + p.layout.src_ntok, p.max_tokens, phase::LL_DISPATCH_RECV, prefix, ld_global_u32);
        let mut u = gw;
        while u < total {
            let (s, t) = locate(prefix, world, u);
            let slot = s as u64 * p.max_tokens as u64 + t as u64;
            // Everything this token needs is loaded at once: routing, the row's first vectors,
            // its scales.
            let word = if lane < MAX_TOPK as u32 {
                ld_global_u32((hb + p.layout.tok_route + slot * 2 * MAX_TOPK as u64 + 4 * (lane / 2) as u64) as *const u32)
            } else {
                u32::MAX
            };
            let src = (hb + p.layout.tok_x + slot * 2 * hidden) as *const [u32; 4];
            let load_round = |r: u32| -> [[u32; 4]; RECV_UNROLL] {
                let mut v = [[0u32; 4]; RECV_UNROLL];
                for (q, vq) in v.iter_mut().enumerate() {
                    let j = r * 32 * RECV_UNROLL as u32 + lane + 32 * q as u32;
                    if j < nvec {
                        *vq = ld_global_v4_u32(src.add(j as usize));
                    }
                }
                v
            };
            let mut v = load_round(0);
            let mut sc = [0u32; MAX_HIDDEN / FP8_GROUP / 32];
            if fp8 {
                for (q, x) in sc.iter_mut().enumerate() {
                    let g = lane + 32 * q as u32;
                    if g < groups {
                        *x = ld_global_u32((hb + p.layout.tok_scales + (slot * groups as u64 + g as u64) * 4) as *const u32);
                    }
                }
            }
            let le = (word >> (16 * (lane % 2))) & 0xffff;
            let mut valid = le != NO_EXPERT;
            if valid && le >= p.experts_per_rank {
                w.report(status::BAD_EXPERT, phase::LL_DISPATCH_RECV, s, p.experts_per_rank as u64, le as u64, 0);
                valid = false;
            }
            let mut row = u32::MAX as u64;
            if valid {
                let pos = atom_relaxed_gpu_global_add_u32((hb + p.layout.slot_counter + 4 * le as u64) as *mut u32, 1) as u64;
                if pos >= rows_pe {
                    w.report(status::CAPACITY, phase::LL_DISPATCH_RECV, rank, rows_pe, pos + 1, 0);
                    valid = false;
                } else {
                    row = le as u64 * rows_pe + pos;
                    st_global_u32((hb + p.layout.recv_meta + 4 * row) as *mut u32, s << 24 | lane << 16 | t);
                }
            }
            if lane < MAX_TOPK as u32 {
                st_global_u32((hb + p.layout.tok_pos + (slot * MAX_TOPK as u64 + lane as u64) * 4) as *mut u32, row as u32);
            }
            let mask = vote_sync_ballot_b32(FULL, valid);
            if mask != 0 {
                let dst = hb + p.layout.recv_x + row.wrapping_mul(row_bytes);
                let rounds = nvec.div_ceil(32 * RECV_UNROLL as u32);
                for r in 0..rounds {
                    if r > 0 {
                        v = load_round(r);
                    }
                    let mut m = mask;
                    while m != 0 {
                        let j = m.trailing_zeros();
                        m &= m - 1;
                        let out = shfl_idx_u64(FULL, dst, j) as *mut [u32; 4];
                        for (q, vq) in v.iter().enumerate() {
                            let i = r * 32 * RECV_UNROLL as u32 + lane + 32 * q as u32;
                            if i < nvec {
                                st_global_v4_u32(out.add(i as usize), *vq);
                            }
                        }
                    }
                }
                if fp8 {
                    let mut m = mask;
                    while m != 0 {
                        let j = m.trailing_zeros();
                        m &= m - 1;
                        let r = shfl_idx_u64(FULL, row, j);
                        for (q, &x) in sc.iter().enumerate() {
                            let g = lane + 32 * q as u32;
                            if g < groups {
                                let at = scale_address(p, hb + p.layout.recv_scales, r, g, groups, rows_pe, scale_rows, ue8m0);
                                if ue8m0 {
                                    st_global_u8(at as *mut u8, (x >> 23) as u8);
                                } else {
                                    st_global_u32(at as *mut u32, x);
                                }
                            }
                        }
                    }
                }
            }
            u += total_warps;
        }
    }
}

/// Heap address of group `g`'s scale of packed row `row` in the dispatch's scale format and
/// layout (`base`: the half's `recv_scales`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scale_address(p: &LlDispatchParams, base: u64, row: u64, g: u32, groups: u32, rows_pe: u64, scale_rows: u64, ue8m0: bool) -> u64 {
    let g = g as u64;
    if p.scale_layout == scale_layout::COLUMN_MAJOR {
        let (e, r) = div_rem_u64(row, rows_pe);
        if ue8m0 {
            let words = groups.div_ceil(4) as u64;
            base + ((e * words + g / 4) * scale_rows + r) * 4 + g % 4
        } else {
            base + ((e * groups as u64 + g) * scale_rows + r) * 4
        }
    } else if ue8m0 {
        base + row * (groups.div_ceil(4) as u64 * 4) + g
    } else {
        base + (row * groups as u64 + g) * 4
    }
}

/// Send half (every block: each received row, or each pre-reduced (token, rank) row, back to
/// its home) and receive half (every block: its share of this rank's tokens), as `stages` says.
/// Dynamic shared memory: [`crate::abi::ll_combine_smem_bytes`] (prefix of the counts, scan scratch).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ll_combine(p: LlCombineParams) {
    let w = Waiter::new(&p.wait);
    // SAFETY: the host passes 0 or a table sized for this grid (`LlBuffer::trace_addr`).
    unsafe { mark(p.trace, trace::START) };
    let (world, rank) = (w.world, w.rank);
    let reduced = p.mode == combine_mode::PRE_REDUCED;
    let tb = p.layout.tables;
    // SAFETY: shapes validated by the host; heap offsets from the buffer's layout; the rank
    // table holds every rank's entry (`LlBuffer`).
    unsafe {
        let remote = Remote::new(p.ranks, p.any_put);
        let own = remote.base(rank);
        let me = control_at(own);
        // This combine's number on this half; the last receive block stores it at the end, so
        // every block reads the same value here.
        let seq = core::ptr::read_volatile(half_slot(&raw mut (*me).ll_combine_seq, p.half)).wrapping_add(1);
        if p.stages & stage::SEND != 0 {
            if ctaid_x() == 0 {
                // This rank's receive half of the previous combine on this half has ended (it
                // is earlier on the stream): peers may write the half again.
                let mut d = tid_x();
                while d < world {
                    remote.st_relaxed_sys_u32(d, rank_word(remote.base(d), tb.combine_free, world, p.half, rank), seq);
                    d += ntid_x();
                }
            }
            // Before any store, every destination must have started this combine on the half
            // (its previous receive there has ended). A destination that never does is
            // reported, and this block sends and signals nothing (the peers time out too).
            // (This rank's own half is free by stream order: no wait on block 0's store.)
            let mut free = true;
            let mut d = tid_x();
            while free && d < world {
                free = d == rank || w.wait_reached(rank_word(own, tb.combine_free, world, p.half, d), seq, phase::LL_COMBINE_SEND, d);
                d += ntid_x();
            }
            if bar_red_and_pred_0(free) {
                if reduced {
                    combine_send_reduced(&p, &w, &remote);
                } else {
                    combine_send(&p, &w, &remote);
                }
                mark(p.trace, trace::SENT);
                remote.signal_all_ranks(&w, |r| rank_word(remote.base(r), tb.combine_arrive, world, p.half, rank));
                mark(p.trace, trace::SIGNALLED);
            }
        }
        if p.stages & stage::RECV != 0 {
            let ok = wait_all_sources(&w, |s| rank_word(own, tb.combine_arrive, world, p.half, s), p.send_blocks, phase::LL_COMBINE_RECV);
            mark(p.trace, trace::ARRIVED);
            // No output: a drain (`LlBuffer::recover_pending_hooks`) only takes the arrivals.
            if ok && p.out != 0 {
                if reduced {
                    combine_reduce_ranks(&p, own);
                } else {
                    combine_reduce(&p, own);
                }
            }
            let last = last_block_done(half_slot(&raw mut (*me).ll_combine_done, p.half));
            mark(p.trace, trace::DONE);
            if last && ok {
                for s in 0..world {
                    st_relaxed_sys_global_u32(rank_word(own, tb.combine_arrive, world, p.half, s), 0);
                }
            }
            if last {
                core::ptr::write_volatile(half_slot(&raw mut (*me).ll_combine_seq, p.half), seq);
            }
        }
        mark(p.trace, trace::END);
    }
}

/// Per-expert send: every packed row goes to slot `[token][k]` of its home, one warp per
/// (row, chunk of `CHUNK` vectors).
unsafe fn combine_send(p: &LlCombineParams, w: &Waiter, remote: &Remote) {
    let (world, rank) = (w.world, w.rank);
    let (tid, nt) = (tid_x(), ntid_x());
    let warps = nt / 32;
    let gw = grid_warp_interleaved();
    let total_warps = nctaid_x() * warps;
    let epr = p.experts_per_rank;
    let rows_per_expert = (world * p.max_tokens) as u64;
    let row_bytes = 2 * p.hidden as u64;
    // SAFETY: this rank is below the launch's rank count.
    let dh = unsafe { remote.base(rank) } + p.dispatch_half_off;
    let prefix = dyn_smem_base();
    // SAFETY: as in `ll_combine`; shared memory holds `epr + 33` words.
    unsafe {
        // Exclusive prefix of the received counts, one pass per block-sized chunk.
        let mut carry = 0u32;
        let mut j0 = 0u32;
        while j0 < epr {
            let j = j0 + tid;
            let mut c = if j < epr { ld_global_nc_s32((dh + p.layout.recv_count + 4 * j as u64) as *const i32) as u32 } else { 0 };
            if !w.index_ok(c as u64, rows_per_expert + 1, bad_index::COUNT, phase::LL_COMBINE_SEND, rank) {
                c = 0;
            }
            let (excl, total) = block_exclusive_scan_u32(c, prefix + 4 * (epr + 1));
            if j < epr {
                st_shared_cta_u32(prefix + 4 * j, carry + excl);
            }
            carry += total;
            j0 += nt;
        }
        if tid == 0 {
            st_shared_cta_u32(prefix + 4 * epr, carry);
        }
        bar_sync_0();
        let total_rows = carry;
        let chunks = (p.hidden / 8).div_ceil(CHUNK);
        let mut unit = gw;
        while unit < total_rows * chunks {
            let (i, c) = div_rem_u32(unit, chunks);
            // The expert of the i-th received row (the last with prefix[e] <= i), and its row.
            let (e, j) = locate(prefix, epr, i);
            let row = e as u64 * rows_per_expert + j as u64;
            let meta = ld_global_nc_s32((dh + p.layout.recv_meta + 4 * row) as *const i32) as u32;
            let (s, kk, t) = (meta >> 24, ((meta >> 16) & 0xff) as u64, (meta & 0xffff) as u64);
            if !(w.index_ok(s as u64, world as u64, bad_index::SOURCE, phase::LL_COMBINE_SEND, rank)
                && w.index_ok(kk, p.slot_k as u64, bad_index::SLOT, phase::LL_COMBINE_SEND, s)
                && w.index_ok(t, p.max_tokens as u64, bad_index::TOKEN, phase::LL_COMBINE_SEND, s))
            {
                unit += total_warps;
                continue;
            }
            let off = c as u64 * CHUNK as u64 * 16;
            let n = core::cmp::min(CHUNK, p.hidden / 8 - c * CHUNK);
            let dst = remote.base(s) + p.combine_half_off + p.layout.comb_x + (t * p.slot_k as u64 + kk) * row_bytes + off;
            let src = p.y + row * row_bytes + off;
            if !remote.put(s) {
                warp_copy_to_lane_dests::<UNROLL>(src, n, dst, 1);
            } else if p.y_in_heap != 0 {
                // The zero-copy input is symmetric memory: sent from where it is (`dst` is this
                // rank's symmetric address of the slot: rank `s`'s table entry is this rank's).
                remote.put_warp(s, dst, src, n as u64 * 16);
            } else {
                // Staged in the zero-copy input of this dispatch's half (the handle's own, which
                // this combine does not read) at the row's own place, then sent.
                let staged = dh + p.layout.comb_in + row * row_bytes + off;
                warp_copy_to_lane_dests::<UNROLL>(src, n, staged, 1);
                remote.put_warp_written(s, dst, staged, n as u64 * 16);
            }
            unit += total_warps;
        }
    }
}

/// Pre-reduced send: for every token this rank received, one warp per (token, chunk) sums
/// `w_k * y_k` over the token's slots here (f32, slot order, fused multiply-add), rounds to
/// bf16 and stores the chunk into slot `[token][k]` of the home, `k` the token's first top-k
/// slot on this rank (the home finds it from its own top-k row).
unsafe fn combine_send_reduced(p: &LlCombineParams, w: &Waiter, remote: &Remote) {
    let (world, rank) = (w.world, w.rank);
    let lane = laneid();
    let warps = ntid_x() / 32;
    let gw = grid_warp_interleaved();
    let total_warps = nctaid_x() * warps;
    let row_bytes = 2 * p.hidden as u64;
    let nvec = p.hidden / 8;
    let chunks = nvec.div_ceil(CHUNK);
    // SAFETY: this rank is below the launch's rank count.
    let dh = unsafe { remote.base(rank) } + p.dispatch_half_off;
    let prefix = dyn_smem_base();
    // Rows of this rank's expert outputs (`p.y`).
    let rows = p.experts_per_rank as u64 * (world * p.max_tokens) as u64;
    // SAFETY: as in `ll_combine`; the dispatch's metadata was written by an earlier kernel;
    // shared memory holds `world + 33` words.
    unsafe {
        let total = token_prefix(w, dh + p.layout.src_ntok, p.max_tokens, phase::LL_COMBINE_SEND, prefix, ld_input_u32);
        let mut unit = gw;
        while unit < total * chunks {
            let (i, c) = div_rem_u32(unit, chunks);
            let (s, t) = locate(prefix, world, i);
            let slot = s as u64 * p.max_tokens as u64 + t as u64;
            let (pos, wt) = if lane < MAX_TOPK as u32 {
                let at = slot * MAX_TOPK as u64 + lane as u64;
                (ld_input_u32((dh + p.layout.tok_pos + 4 * at) as *const u32), ld_global_nc_f32((dh + p.layout.tok_w + 4 * at) as *const f32))
            } else {
                (u32::MAX, 0.0)
            };
            let pos = if pos == u32::MAX || w.index_ok(pos as u64, rows, bad_index::ROW, phase::LL_COMBINE_SEND, rank) { pos } else { u32::MAX };
            let kmask = vote_sync_ballot_b32(FULL, pos != u32::MAX);
            let kk = kmask.trailing_zeros();
            if kmask != 0 && w.index_ok(kk as u64, p.slot_k as u64, bad_index::SLOT, phase::LL_COMBINE_SEND, s) {
                let end = core::cmp::min(nvec, (c + 1) * CHUNK);
                let dst = remote.base(s) + p.combine_half_off + p.layout.comb_x + (t as u64 * p.slot_k as u64 + kk as u64) * row_bytes;
                // For a put rank the sum is staged in the dispatch half's slot of the token
                // (`tok_x`, consumed by the dispatch's receive half), then sent.
                let out = if remote.put(s) { dh + p.layout.tok_x + slot * row_bytes } else { dst };
                weighted_sum_rows(
                    kmask,
                    wt,
                    |kk| p.y + shfl_sync_idx_b32(FULL, pos, kk) as u64 * row_bytes,
                    ld_global_nc_v4_u32,
                    c * CHUNK,
                    end,
                    out,
                );
                if remote.put(s) {
                    let from = 16 * (c * CHUNK) as u64;
                    remote.put_warp_written(s, dst + from, out + from, 16 * (end - c * CHUNK) as u64);
                }
            }
            unit += total_warps;
        }
    }
}

/// `out[base..end] = bf16(sum over k in kmask, ascending, of w_k * row(k))` with fused
/// multiply-adds in f32, where lane `k` holds `w_k`; `row(k)` gives row k's address.
#[inline(always)]
unsafe fn weighted_sum_rows(
    kmask: u32,
    wt: f32,
    row: impl Fn(u32) -> u64,
    load: unsafe fn(*const [u32; 4]) -> [u32; 4],
    start: u32,
    end: u32,
    out: u64,
) {
    let lane = laneid();
    let mut base = start;
    while base < end {
        let mut acc = [[0f32; 8]; UNROLL];
        let load_slot = |kk: u32| -> [[u32; 4]; UNROLL] {
            let r = row(kk) as *const [u32; 4];
            let mut v = [[0u32; 4]; UNROLL];
            for (u, vu) in v.iter_mut().enumerate() {
                let j = base + lane + 32 * u as u32;
                if j < end {
                    // SAFETY: the caller's rows hold `end` vectors.
                    *vu = unsafe { load(r.add(j as usize)) };
                }
            }
            v
        };
        let fma_slot = |acc: &mut [[f32; 8]; UNROLL], kk: u32, v: &[[u32; 4]; UNROLL]| {
            let wk = f32::from_bits(shfl_sync_idx_b32(FULL, wt.to_bits(), kk));
            for (u, a) in acc.iter_mut().enumerate() {
                for q in 0..4 {
                    let (x0, x1) = unpack_bf16x2(v[u][q]);
                    a[2 * q] = fma_rn_f32(wk, x0, a[2 * q]);
                    a[2 * q + 1] = fma_rn_f32(wk, x1, a[2 * q + 1]);
                }
            }
        };
        // Two slots' loads in flight at a time; the sums still go slot by slot, in order.
        let mut m = kmask;
        while m != 0 {
            let ka = m.trailing_zeros();
            m &= m - 1;
            let va = load_slot(ka);
            if m != 0 {
                let kb = m.trailing_zeros();
                m &= m - 1;
                let vb = load_slot(kb);
                fma_slot(&mut acc, ka, &va);
                fma_slot(&mut acc, kb, &vb);
            } else {
                fma_slot(&mut acc, ka, &va);
            }
        }
        for (u, a) in acc.iter().enumerate() {
            let j = base + lane + 32 * u as u32;
            if j < end {
                // SAFETY: the caller's output holds `end` vectors.
                unsafe { st_global_v4_u32((out + j as u64 * 16) as *mut [u32; 4], pack_bf16x8(a)) };
            }
        }
        base += 32 * UNROLL as u32;
    }
}

/// Per-expert receive: one warp per (token, chunk) sums `w_k * y_k` over the token's slots.
unsafe fn combine_reduce(p: &LlCombineParams, own: u64) {
    let lane = laneid();
    let warps = ntid_x() / 32;
    let gw = grid_warp_interleaved();
    let total_warps = nctaid_x() * warps;
    let k = p.k as usize;
    let num_experts = p.experts_per_rank as i64 * p.wait.world as i64;
    let row_bytes = 2 * p.hidden as u64;
    let nvec = p.hidden / 8;
    let chunks = nvec.div_ceil(CHUNK);
    let ch = own + p.combine_half_off + p.layout.comb_x;
    let is64 = p.idx_i64 != 0;
    // SAFETY: as in `ll_combine`.
    unsafe {
        let mut unit = gw;
        while unit < p.num_tokens * chunks {
            let (t, c) = div_rem_u32(unit, chunks);
            let (e, wt) = if (lane as usize) < k {
                let i = t as usize * k + lane as usize;
                (load_topk_idx(p.topk_idx, i, is64), ld_global_nc_f32((p.topk_weights as *const f32).add(i)))
            } else {
                (-1, 0.0)
            };
            let kmask = vote_sync_ballot_b32(FULL, e >= 0 && e < num_experts);
            let end = core::cmp::min(nvec, (c + 1) * CHUNK);
            let out = p.out + t as u64 * row_bytes;
            weighted_sum_rows(kmask, wt, |kk| ch + (t as u64 * p.slot_k as u64 + kk as u64) * row_bytes, ld_global_v4_u32, c * CHUNK, end, out);
            unit += total_warps;
        }
    }
}

/// Pre-reduced receive: one warp per (token, chunk) adds the rows of the ranks that hold the
/// token, in rank order (f32), and rounds once. Rank `r`'s row lies at the token's first top-k
/// slot on `r`.
unsafe fn combine_reduce_ranks(p: &LlCombineParams, own: u64) {
    let lane = laneid();
    let warps = ntid_x() / 32;
    let gw = grid_warp_interleaved();
    let total_warps = nctaid_x() * warps;
    let k = p.k as usize;
    let epr = p.experts_per_rank as i64;
    let num_experts = epr * p.wait.world as i64;
    let row_bytes = 2 * p.hidden as u64;
    let nvec = p.hidden / 8;
    let chunks = nvec.div_ceil(CHUNK);
    let ch = own + p.combine_half_off + p.layout.comb_x;
    let is64 = p.idx_i64 != 0;
    // SAFETY: as in `ll_combine`.
    unsafe {
        let mut unit = gw;
        while unit < p.num_tokens * chunks {
            let (t, c) = div_rem_u32(unit, chunks);
            let e = if (lane as usize) < k { load_topk_idx(p.topk_idx, t as usize * k + lane as usize, is64) } else { -1 };
            let valid = e >= 0 && e < num_experts;
            let r = if valid { div_rem_u64(e as u64, epr as u64).0 as u32 } else { u32::MAX };
            // The token's ranks, each at its first slot, put in rank order: `order` of a first
            // slot is how many first slots have a lower rank; lane `o` then learns the slot of
            // order `o` (`slot_of`).
            let first = first_of_its_value(r) && valid;
            let firsts = vote_sync_ballot_b32(FULL, first);
            let mut order = 0u32;
            for j in 0..MAX_TOPK as u32 {
                let rj = shfl_sync_idx_b32(FULL, r, j);
                if firsts >> j & 1 != 0 && rj < r {
                    order += 1;
                }
            }
            let mut slot_of = 0u32;
            for j in 0..MAX_TOPK as u32 {
                let oj = shfl_sync_idx_b32(FULL, order, j);
                if firsts >> j & 1 != 0 && oj == lane {
                    slot_of = j;
                }
            }
            let n = firsts.count_ones();
            let ranks = if n >= 32 { FULL } else { (1u32 << n) - 1 };
            let end = core::cmp::min(nvec, (c + 1) * CHUNK);
            let mut base = c * CHUNK;
            while base < end {
                let mut acc = [[0f32; 8]; UNROLL];
                let row = |o: u32| ch + (t as u64 * p.slot_k as u64 + shfl_sync_idx_b32(FULL, slot_of, o) as u64) * row_bytes;
                accumulate_rows_in_order(&mut acc, ranks, row, |_| false, base, end);
                for (u, a) in acc.iter().enumerate() {
                    let j = base + lane + 32 * u as u32;
                    if j < end {
                        st_global_v4_u32((p.out + t as u64 * row_bytes + j as u64 * 16) as *mut [u32; 4], pack_bf16x8(a));
                    }
                }
                base += 32 * UNROLL as u32;
            }
            unit += total_warps;
        }
    }
}
