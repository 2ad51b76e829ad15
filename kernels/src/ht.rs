//! High-throughput (prefill) kernels: layout, notify, dispatch, combine.
//!
//! Dispatch writes every row once, straight into its final place in the receiver's heap
//! (`recv_x[row]`), reading the token once and storing it to each rank that needs it. Counts
//! are exchanged first (notify), so every sender knows its rows' places in every receiver.
//! Combine splits its blocks: pushers write each received row into slot `[expert rank][token]`
//! of the home rank's staging area and raise that slot's flag; reducers on the home sum a
//! token's rows as soon as its flags are up, in rank order (f32), so the result is bitwise
//! deterministic and the reduction overlaps the transfer. A rank's own rows are read straight
//! from the combine input.
//!
//! Protocol (see `docs/protocol.md`): notify flags are the notify call counter, released at
//! `.sys` and acquired by the owner; dispatch ends with one `fence.acq_rel.sys` per block and a
//! relaxed add per (block, rank) on the receiver's arrival counter, which the receiver acquires, waits to reach the
//! sender's grid size, and zeroes; combine releases one flag per row, which the reducer
//! acquires and then zeroes.
use crate::abi::{HT_PUSH_STAGES, HtCombineParams, HtDispatchParams, HtLayoutParams, HtNotifyParams, bad_index, phase, status};
use crate::dev::{
    FULL, accumulate_rows, accumulate_rows_in_order, block_exclusive_scan_u32, div_rem_u32, div_rem_u64, load_topk_idx, pack_bf16x8, peer_base,
    shfl_idx_u64, warp_copy_to_lane_dests,
};
use crate::ptx::{
    add_rn_f32, atom_shared_cta_add_u32, bar_red_and_pred_0, bar_sync_0, bar_warp_sync, cp_async_bulk_commit_group,
    cp_async_bulk_global_shared_cta_bulk_group, cp_async_bulk_shared_cluster_global_mbarrier_complete_tx_bytes, cp_async_bulk_wait_group,
    cp_async_bulk_wait_group_read, ctaid_x, dyn_smem_base, fence_acq_rel_sys, fence_proxy_async_global, fence_proxy_async_shared_cta, laneid,
    ld_global_nc_f32, ld_global_nc_s32, ld_global_nc_u8, ld_global_nc_v4_u32, ld_relaxed_sys_global_u32, ld_shared_cta_u32,
    mbarrier_arrive_expect_tx_shared_cta_b64, mbarrier_init_shared_cta_b64, mbarrier_try_wait_parity_shared_cta_b64, nctaid_x, ntid_x,
    shfl_sync_bfly_b32, shfl_sync_idx_b32, st_global_u8, st_global_u32, st_global_v4_u32, st_relaxed_sys_global_u32, st_release_sys_global_u32,
    st_shared_cta_u32, tid_x, vote_sync_any_pred, vote_sync_ballot_b32,
};
use crate::sync::{Waiter, control, half_rank_slot, rank_slot, signal_all_ranks, wait_all_sources};

/// Vectors in flight per lane in the dispatch row copies.
const UNROLL: usize = 4;
/// Vectors in flight per lane when combine pushes rows home (more bytes in flight per warp
/// keep the link busy with fewer pushing blocks).
const PUSH_UNROLL: usize = 8;
/// Vectors per lane per step of the combine reduction.
const RED_UNROLL: usize = 4;

/// One block per destination rank: is_token_in_rank, token positions, counts.
/// Dynamic shared memory: [`crate::abi::ht_layout_smem_bytes`] (`4 * (32 + E / R)` bytes).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ht_layout(p: HtLayoutParams) {
    let w = Waiter::new(&p.wait);
    let r = ctaid_x();
    let (tid, nt, world) = (tid_x(), ntid_x(), w.world);
    let (n, k, e) = (p.num_tokens, p.k as usize, p.num_experts as i64);
    let epr = div_rem_u32(p.num_experts, world).0;
    let lo = (r * epr) as i64;
    let hi = lo + epr as i64;
    let smem = dyn_smem_base();
    let counters = smem + 128;
    let is64 = p.idx_i64 != 0;
    // SAFETY: the launcher sizes shared memory for `epr` counters; the host validated every
    // array's shape, so token `t < n` and slot `j < k` are in bounds.
    unsafe {
        let mut j = tid;
        while j < epr {
            st_shared_cta_u32(counters + 4 * j, 0);
            j += nt;
        }
        bar_sync_0();
        // Rounds of `nt` consecutive tokens, one per thread (coalesced reads, all k ids of a
        // token in flight at once); a block scan per round keeps positions in token order.
        let mut total = 0u32;
        let mut t0 = 0u32;
        while t0 < n {
            let t = t0 + tid;
            let mut hit = false;
            if t < n {
                // Eight ids in flight at a time (a larger register array would not unroll and
                // would land in local memory).
                let mut bad = None;
                for j0 in (0..k).step_by(8) {
                    let mut ids = [-1i64; 8];
                    for (j, id) in ids.iter_mut().enumerate() {
                        if j0 + j < k {
                            *id = load_topk_idx(p.topk_idx, t as usize * k + j0 + j, is64);
                        }
                    }
                    for (j, &x) in ids.iter().enumerate() {
                        if j0 + j < k {
                            if x < -1 || x >= e {
                                bad = Some(x);
                            } else if x >= lo && x < hi {
                                hit = true;
                                atom_shared_cta_add_u32(counters + 4 * (x - lo) as u32, 1);
                            }
                        }
                    }
                }
                if let Some(x) = bad {
                    if r == 0 {
                        w.report(status::BAD_EXPERT, phase::HT_LAYOUT, t, e as u64, x as u64, 0);
                    }
                }
            }
            let (pos, round) = block_exclusive_scan_u32(hit as u32, smem);
            if t < n {
                let at = t as usize * world as usize + r as usize;
                st_global_u8((p.is_token_in_rank as *mut u8).add(at), hit as u8);
                st_global_u32((p.token_pos as *mut u32).add(at), if hit { total + pos } else { u32::MAX });
            }
            total += round;
            t0 += nt;
        }
        bar_sync_0();
        if tid == 0 {
            st_global_u32((p.tokens_per_rank as *mut u32).add(r as usize), total);
        }
        let mut j = tid;
        while j < epr {
            st_global_u32((p.tokens_per_expert as *mut u32).add((lo as u32 + j) as usize), ld_shared_cta_u32(counters + 4 * j));
            j += nt;
        }
    }
}

/// One block: sends this rank's counts to every rank, waits for everyone's, computes where
/// this rank's rows go in every receiver and where each source's rows land here.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ht_notify(p: HtNotifyParams) {
    let w = Waiter::new(&p.wait);
    let (tid, nt, world, rank) = (tid_x(), ntid_x(), w.world, w.rank);
    let epr = p.experts_per_rank;
    let rec_len = world + epr;
    let me = control(&p.peers, rank);
    // Record written by `src` into rank `r`'s notify area, parity `par`.
    let rec = |r: u32, par: u32, src: u32| -> *mut i32 {
        (peer_base(&p.peers, r) + p.notify_off + (((par * world + src) * rec_len) as u64) * 4) as *mut i32
    };
    // SAFETY: heap offsets come from the buffer's layout; inputs were sized by the host.
    unsafe {
        let seq = core::ptr::read_volatile(&raw const (*me).notify_seq).wrapping_add(1);
        bar_sync_0();
        if tid == 0 {
            core::ptr::write_volatile(&raw mut (*me).notify_seq, seq);
        }
        let par = seq & 1;
        let mut idx = tid;
        while idx < world * rec_len {
            let (r, i) = div_rem_u32(idx, rec_len);
            let v = if i < world {
                ld_global_nc_s32((p.tokens_per_rank as *const i32).add(i as usize))
            } else {
                ld_global_nc_s32((p.tokens_per_expert as *const i32).add((r * epr + i - world) as usize))
            };
            st_global_u32(rec(r, par, rank).add(i as usize) as *mut u32, v as u32);
            idx += nt;
        }
        bar_sync_0();
        let mut ok = true;
        if tid < world {
            fence_acq_rel_sys();
            st_release_sys_global_u32(half_rank_slot(&raw mut (*control(&p.peers, tid)).notify_flags, par, rank), seq);
            ok = w.wait_eq(half_rank_slot(&raw mut (*me).notify_flags, par, tid), seq, phase::HT_NOTIFY, tid);
        }
        let ok = bar_red_and_pred_0(ok);
        // Count rank `s` sends to rank `r`, as `s` told this rank.
        let c = |s: u32, r: u32| -> u32 { if ok { ld_relaxed_sys_global_u32(rec(rank, par, s).add(r as usize) as *const u32) } else { 0 } };
        // Thread 0 computes the offsets; `fine` tells the host whether they are usable.
        let mut fine = ok;
        if tid == 0 {
            let mut mine = 0u32;
            for s in 0..world {
                mine += c(s, rank);
            }
            let fits = mine <= p.capacity;
            let mut acc = 0u32;
            for s in 0..world {
                st_global_u32((p.src_base as *mut u32).add(s as usize), if fits { acc } else { 0 });
                acc += c(s, rank);
            }
            st_global_u32((p.src_base as *mut u32).add(world as usize), if fits { acc } else { 0 });
            for r in 0..world {
                let (mut before, mut total) = (0u32, 0u32);
                for s in 0..world {
                    if s < rank {
                        before += c(s, r);
                    }
                    total += c(s, r);
                }
                let base = if !ok {
                    u32::MAX
                } else if total > p.capacity {
                    w.report(status::CAPACITY, phase::HT_NOTIFY, r, p.capacity as u64, total as u64, 0);
                    fine = false;
                    u32::MAX
                } else {
                    before
                };
                st_global_u32((p.dest_base as *mut u32).add(r as usize), base);
            }
        }
        let host = p.num_recv_host as *mut u32;
        let mut j = tid;
        while j < epr {
            let mut sum = 0u32;
            for s in 0..world {
                sum += if ok { ld_relaxed_sys_global_u32(rec(rank, par, s).add((world + j) as usize) as *const u32) } else { 0 };
            }
            let a = p.expert_alignment;
            let sum = if a > 1 { sum.div_ceil(a) * a } else { sum };
            st_global_u32((p.recv_expert_counts as *mut u32).add(j as usize), sum);
            if !host.is_null() {
                st_relaxed_sys_global_u32(host.add(2 + j as usize), sum);
            }
            j += nt;
        }
        bar_sync_0();
        if tid == 0 && !host.is_null() {
            let n = ld_relaxed_sys_global_u32((p.src_base as *const u32).add(world as usize));
            st_relaxed_sys_global_u32(host.add(1), if fine { n } else { u32::MAX });
            fence_acq_rel_sys();
            st_release_sys_global_u32(host, p.host_ticket);
        }
    }
}

/// Sends every token to every rank that needs it, straight into its final row there, then
/// signals; block 0 waits until every source's blocks have signalled this rank.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ht_dispatch(p: HtDispatchParams) {
    let w = Waiter::new(&p.wait);
    let (lane, world, rank) = (laneid(), w.world, w.rank);
    let warps = ntid_x() / 32;
    let gw = ctaid_x() * warps + tid_x() / 32;
    let total_warps = nctaid_x() * warps;
    let (k, epr) = (p.k as usize, p.experts_per_rank as i64);
    let row_bytes = p.row_bytes as u64;
    let nvec = p.row_bytes / 16;
    let cols = p.scale_cols as usize;
    let is64 = p.idx_i64 != 0;
    // SAFETY: the host validated every input's shape; heap offsets come from the layout and
    // rows from notify (a destination that would overflow has base -1 and gets nothing).
    unsafe {
        let my_base = if lane < world { ld_global_nc_s32((p.dest_base as *const i32).add(lane as usize)) } else { -1 };
        let lane_peer = peer_base(&p.peers, lane);
        let mut t = gw;
        while t < p.num_tokens {
            let pos = if lane < world { ld_global_nc_s32((p.token_pos as *const i32).add((t * world + lane) as usize)) } else { -1 };
            let row: i64 = if pos >= 0 && my_base >= 0 { (my_base + pos) as i64 } else { -1 };
            let mask = vote_sync_ballot_b32(FULL, row >= 0);
            if mask != 0 {
                let dst = lane_peer.wrapping_add(p.recv_x_off).wrapping_add(row as u64 * row_bytes);
                warp_copy_to_lane_dests::<UNROLL>(p.x + t as u64 * row_bytes, nvec, dst, mask);
                if row >= 0 {
                    st_global_u32((lane_peer + p.recv_src_off + row as u64 * 4) as *mut u32, t);
                }
                // Metadata: lane d of the warp knows destination d's row and heap base.
                let (e, wt) = if p.topk_idx != 0 && (lane as usize) < k {
                    let i = t as usize * k + lane as usize;
                    let wt = if p.topk_weights != 0 { ld_global_nc_f32((p.topk_weights as *const f32).add(i)) } else { 0.0 };
                    (load_topk_idx(p.topk_idx, i, is64), wt)
                } else {
                    (-1, 0.0)
                };
                let mut m = mask;
                while m != 0 {
                    let d = m.trailing_zeros();
                    m &= m - 1;
                    let drow = shfl_idx_u64(FULL, row as u64, d);
                    let dbase = shfl_idx_u64(FULL, lane_peer, d);
                    if p.topk_idx != 0 && (lane as usize) < k {
                        let local = if e >= 0 && div_rem_u64(e as u64, epr as u64).0 == d as u64 { (e - d as i64 * epr) as i32 } else { -1 };
                        let at = (drow * k as u64 + lane as u64) * 4;
                        st_global_u32((dbase + p.recv_idx_off + at) as *mut u32, local as u32);
                        if p.topk_weights != 0 {
                            let v = if local >= 0 { wt } else { 0.0 };
                            st_global_u32((dbase + p.recv_w_off + at) as *mut u32, v.to_bits());
                        }
                    }
                    if p.scales != 0 {
                        let mut j = lane as usize;
                        while j < cols {
                            let s = ld_global_nc_f32((p.scales as *const f32).add(t as usize * cols + j));
                            let at = (drow * cols as u64 + j as u64) * 4;
                            st_global_u32((dbase + p.recv_scales_off + at) as *mut u32, s.to_bits());
                            j += 32;
                        }
                    }
                }
            }
            t += total_warps;
        }
        signal_all_ranks(&w, |r| rank_slot(&raw mut (*control(&p.peers, r)).ht_dispatch_arrive, rank));
        if ctaid_x() == 0 {
            let me = control(&p.peers, rank);
            let ok = wait_all_sources(&w, |s| rank_slot(&raw mut (*me).ht_dispatch_arrive, s), nctaid_x(), phase::HT_DISPATCH);
            if ok && tid_x() < world {
                st_relaxed_sys_global_u32(rank_slot(&raw mut (*me).ht_dispatch_arrive, tid_x()), 0);
            }
        }
    }
}

/// Combine. Blocks `0..push_blocks` push: every received row of another home goes to slot
/// `[this rank][token]` of that home's staging area, then its flag is released. The other
/// blocks reduce this rank's tokens in order: wait for the flags of the ranks that hold the
/// token, sum the rows in rank order (this rank's own row straight from `y`), zero the flags.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ht_combine(p: HtCombineParams) {
    let w = Waiter::new(&p.wait);
    let (lane, world, rank) = (laneid(), w.world, w.rank);
    let warps = ntid_x() / 32;
    let warp = tid_x() / 32;
    let k = p.k as u64;
    let row_bytes = p.hidden as u64 * 2;
    let nvec = p.hidden / 8;
    let slot = |s: u32, t: u32| s as u64 * p.max_tokens as u64 + t as u64;
    // SAFETY: shapes validated by the host; staging slots `[R][max_tokens]` hold every token
    // index a home rank can have (the host checked N <= max_tokens).
    unsafe {
        let src_base = p.src_base as *const i32;
        let received = ld_global_nc_s32(src_base.add(world as usize)) as u32;
        let num_recv = core::cmp::min(received, p.y_rows);
        if received > p.y_rows && ctaid_x() == 0 && tid_x() == 0 {
            w.report(status::SHORT_INPUT, phase::HT_COMBINE, rank, p.y_rows as u64, received as u64, 0);
        }
        let own = peer_base(&p.peers, rank);
        if ctaid_x() < p.push_blocks && p.bulk_pushers != 0 {
            if lane == 0 && warp < p.bulk_pushers {
                push_rows_bulk(&p, &w, num_recv, warp);
            }
        } else if ctaid_x() < p.push_blocks {
            // Rows of source s are [start_s, start_s + count_s); visit them round-robin over
            // sources so every home gets its tokens at the same pace, in token order.
            let (start, count) = if lane < world {
                let a = ld_global_nc_s32(src_base.add(lane as usize)) as u32;
                let b = core::cmp::min(ld_global_nc_s32(src_base.add(lane as usize + 1)) as u32, num_recv);
                (a, b.saturating_sub(a))
            } else {
                (0, 0)
            };
            let mut most = count;
            let mut d = 1;
            while d < 32 {
                most = core::cmp::max(most, shfl_sync_bfly_b32(FULL, most, d));
                d <<= 1;
            }
            let mut v = ctaid_x() * warps + warp;
            while v < world * most {
                let (j, s) = div_rem_u32(v, world);
                let first = shfl_sync_idx_b32(FULL, start, s);
                if s != rank && j < shfl_sync_idx_b32(FULL, count, s) {
                    let i = first + j;
                    let t = ld_global_nc_s32((p.recv_src + i as u64 * 4) as *const i32) as u32;
                    if !w.index_ok(t as u64, p.max_tokens as u64, bad_index::TOKEN, phase::HT_COMBINE, s) {
                        v += p.push_blocks * warps;
                        continue;
                    }
                    let home = peer_base(&p.peers, s);
                    let dst = home + p.comb_x_off + slot(rank, t) * row_bytes;
                    warp_copy_to_lane_dests::<PUSH_UNROLL>(p.y + i as u64 * row_bytes, nvec, dst, 1);
                    if p.y_weights != 0 && (lane as u64) < k {
                        let wv = ld_global_nc_f32((p.y_weights as *const f32).add((i as u64 * k + lane as u64) as usize));
                        st_global_u32((home + p.comb_w_off + (slot(rank, t) * k + lane as u64) * 4) as *mut u32, wv.to_bits());
                    }
                    // The warp's stores, then the flag (release covers the whole warp after
                    // the warp barrier).
                    bar_warp_sync(FULL);
                    if lane == 0 {
                        st_release_sys_global_u32((home + p.comb_flags_off + slot(rank, t) * 4) as *mut u32, 1);
                    }
                }
                v += p.push_blocks * warps;
            }
        } else {
            let local_base = ld_global_nc_s32(src_base.add(rank as usize)) as u64;
            let reducers = (nctaid_x() - p.push_blocks) * warps;
            let mut t = (ctaid_x() - p.push_blocks) * warps + warp;
            while t < p.num_tokens {
                let inr = if lane < world { ld_global_nc_u8((p.is_token_in_rank as *const u8).add((t * world + lane) as usize)) } else { 0 };
                let mask = vote_sync_ballot_b32(FULL, inr != 0);
                let mut ok = true;
                if lane < world && lane != rank && inr != 0 {
                    let flag = (own + p.comb_flags_off + slot(lane, t) * 4) as *mut u32;
                    ok = w.wait_eq(flag, 1, phase::HT_COMBINE, lane);
                    if ok {
                        st_relaxed_sys_global_u32(flag, 0);
                    }
                }
                // The acquiring lanes' view reaches the whole warp before anyone reads the rows.
                bar_warp_sync(FULL);
                let local_row = if mask >> rank & 1 != 0 {
                    local_base + ld_global_nc_s32((p.token_pos as *const i32).add((t * world + rank) as usize)) as u64
                } else {
                    0
                };
                let short = mask >> rank & 1 != 0 && local_row >= num_recv as u64;
                if short && lane == 0 {
                    w.report(status::SHORT_INPUT, phase::HT_COMBINE, rank, p.y_rows as u64, local_row + 1, 0);
                }
                if vote_sync_any_pred(FULL, !ok) || short {
                    // Reported; leave the token (the host turns the record into an error).
                    t += reducers;
                    continue;
                }
                let at = t as u64 * row_bytes;
                let mut base = 0u32;
                while base < nvec {
                    let mut acc = [[0f32; 8]; RED_UNROLL];
                    // Ranks in order; this rank's own row straight from the input.
                    accumulate_rows_in_order(
                        &mut acc,
                        mask,
                        |r| if r == rank { p.y + local_row * row_bytes } else { own + p.comb_x_off + slot(r, t) * row_bytes },
                        |r| r == rank,
                        base,
                        nvec,
                    );
                    if p.bias0 != 0 {
                        accumulate_rows(&mut acc, p.bias0 + at, base, nvec, ld_global_nc_v4_u32);
                    }
                    if p.bias1 != 0 {
                        accumulate_rows(&mut acc, p.bias1 + at, base, nvec, ld_global_nc_v4_u32);
                    }
                    for (u, a) in acc.iter().enumerate() {
                        let j = base + lane + 32 * u as u32;
                        if j < nvec {
                            st_global_v4_u32((p.out + at + j as u64 * 16) as *mut [u32; 4], pack_bf16x8(a));
                        }
                    }
                    base += 32 * RED_UNROLL as u32;
                }
                if p.out_weights != 0 && (lane as u64) < k {
                    let mut acc = 0f32;
                    for r in 0..world {
                        if mask >> r & 1 != 0 {
                            let a = if r == rank {
                                p.y_weights + (local_row * k + lane as u64) * 4
                            } else {
                                own + p.comb_w_off + (slot(r, t) * k + lane as u64) * 4
                            };
                            acc = add_rn_f32(acc, f32::from_bits(ld_relaxed_sys_global_u32(a as *const u32)));
                        }
                    }
                    st_global_u32((p.out_weights as *mut u32).add((t as u64 * k + lane as u64) as usize), acc.to_bits());
                }
                t += reducers;
            }
        }
    }
}

/// The bulk push of `ht_combine`, one thread (`pusher` of the block's `bulk_pushers`): rows
/// of other homes, visited round-robin over sources as in the register push, go through
/// [`HT_PUSH_STAGES`] shared row buffers. Each buffer is loaded ahead (`cp.async.bulk` from
/// global memory, completing on the buffer's mbarrier), so while one row is stored the next
/// rows' loads are in flight. A row is stored from its buffer into the home's staging slot
/// (`cp.async.bulk` to the peer's memory, one bulk group per row); the buffer is loaded again
/// once that store has read it. Up to [`PUSH_PENDING`] stores per thread are in flight; a row's
/// flag is released when its group has completed (`wait_group`, then
/// `fence.proxy.async.global`), as the window moves or at the end.
#[inline(always)]
unsafe fn push_rows_bulk(p: &HtCombineParams, w: &Waiter, num_recv: u32, pusher: u32) {
    const S: u32 = HT_PUSH_STAGES;
    let (world, rank) = (p.wait.world, p.wait.rank);
    let k = p.k as u64;
    let row_bytes = p.hidden * 2;
    let slot = |s: u32, t: u32| s as u64 * p.max_tokens as u64 + t as u64;
    let bufs = dyn_smem_base() + pusher * S * row_bytes;
    let bars = dyn_smem_base() + p.bulk_pushers * S * row_bytes + pusher * S * 8;
    // SAFETY: shapes validated by the host (rows 16-byte aligned, a multiple of 16 bytes; the
    // launch's dynamic shared memory holds every pusher's buffers and mbarriers); staging slots
    // as in `ht_combine`.
    unsafe {
        let src_base = p.src_base as *const i32;
        let range = |s: u32| -> (u32, u32) {
            let a = ld_global_nc_s32(src_base.add(s as usize)) as u32;
            let b = core::cmp::min(ld_global_nc_s32(src_base.add(s as usize + 1)) as u32, num_recv);
            (a, b.saturating_sub(a))
        };
        let mut most = 0;
        for s in 0..world {
            most = core::cmp::max(most, range(s).1);
        }
        for b in 0..S {
            mbarrier_init_shared_cta_b64(bars + 8 * b, 1);
        }
        fence_proxy_async_shared_cta();
        // This thread's next row: (input row, token, home rank), skipping its own rank's rows.
        let stride = p.push_blocks * p.bulk_pushers;
        let mut v = ctaid_x() * p.bulk_pushers + pusher;
        let mut next = || -> Option<(u32, u32, u32)> {
            while v < world * most {
                let (j, s) = div_rem_u32(v, world);
                v += stride;
                let (first, count) = range(s);
                if s != rank && j < count {
                    let i = first + j;
                    let t = ld_global_nc_s32((p.recv_src + i as u64 * 4) as *const i32) as u32;
                    if w.index_ok(t as u64, p.max_tokens as u64, bad_index::TOKEN, phase::HT_COMBINE, s) {
                        return Some((i, t, s));
                    }
                }
            }
            None
        };
        let load = |b: u32, i: u32| {
            mbarrier_arrive_expect_tx_shared_cta_b64(bars + 8 * b, row_bytes);
            cp_async_bulk_shared_cluster_global_mbarrier_complete_tx_bytes(
                bufs + b * row_bytes,
                (p.y + i as u64 * row_bytes as u64) as *const u8,
                row_bytes,
                bars + 8 * b,
            );
        };
        // The row in each buffer (valid where `has`).
        let mut rows = [(0u32, 0u32, 0u32); S as usize];
        let mut has = [false; S as usize];
        for b in 0..S {
            if let Some(r) = next() {
                load(b, r.0);
                rows[b as usize] = r;
                has[b as usize] = true;
            }
        }
        // Flags of the stores in flight: `released..issued`, at `index % PUSH_PENDING`.
        let mut flags = [0u64; PUSH_PENDING as usize];
        let (mut issued, mut released) = (0u32, 0u32);
        let mut step = 0u32;
        loop {
            let b = step % S;
            if !has[b as usize] {
                break;
            }
            let (i, t, s) = rows[b as usize];
            let home = peer_base(&p.peers, s);
            if p.y_weights != 0 {
                for l in 0..k {
                    let wv = ld_global_nc_f32((p.y_weights as *const f32).add((i as u64 * k + l) as usize));
                    st_global_u32((home + p.comb_w_off + (slot(rank, t) * k + l) * 4) as *mut u32, wv.to_bits());
                }
            }
            while !mbarrier_try_wait_parity_shared_cta_b64(bars + 8 * b, (step / S) & 1) {}
            cp_async_bulk_global_shared_cta_bulk_group(
                (home + p.comb_x_off + slot(rank, t) * row_bytes as u64) as *mut u8,
                bufs + b * row_bytes,
                row_bytes,
            );
            cp_async_bulk_commit_group();
            flags[(issued % PUSH_PENDING) as usize] = home + p.comb_flags_off + slot(rank, t) * 4;
            issued += 1;
            if issued - released == PUSH_PENDING {
                // The oldest store has completed: publish its row.
                cp_async_bulk_wait_group::<{ PUSH_PENDING - 1 }>();
                fence_proxy_async_global();
                st_release_sys_global_u32(flags[(released % PUSH_PENDING) as usize] as *mut u32, 1);
                released += 1;
            }
            match next() {
                Some(r) => {
                    // The store has read the buffer: load the next row into it.
                    cp_async_bulk_wait_group_read::<0>();
                    load(b, r.0);
                    rows[b as usize] = r;
                }
                None => has[b as usize] = false,
            }
            step += 1;
        }
        cp_async_bulk_wait_group::<0>();
        fence_proxy_async_global();
        while released < issued {
            st_release_sys_global_u32(flags[(released % PUSH_PENDING) as usize] as *mut u32, 1);
            released += 1;
        }
    }
}

/// Bulk stores per pushing thread whose rows are not yet published.
const PUSH_PENDING: u32 = 8;
