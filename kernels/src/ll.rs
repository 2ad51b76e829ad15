//! Low-latency (decode) kernels: no count exchange, fixed addresses.
//!
//! Dispatch: for each (token, top-k slot) the sender reserves a row in the destination
//! expert's receive area with one `atom.relaxed.sys.add` on that expert's slot counter in
//! the receiver's heap, writes metadata and the row (cast to FP8 on the way, scales beside),
//! and after all its tokens every block adds 1 to each rank's arrival counter with a `.sys`
//! release. The receive half waits until every source's blocks have arrived; the slot counters
//! are then the per-expert row counts (rows are contiguous from 0, in no particular order).
//! It copies them out and zeroes them for the next call of this half.
//!
//! Combine: each received row goes back to slot `[token][k]` of its home rank; the home waits
//! for every rank's blocks, then sums `w_k * y_k` in f32 over k in order (fused multiply-add).
//!
//! Halves alternate per call on the host, so a call's receive half cleans what the next call
//! of the same half needs; see `docs/protocol.md` for the ordering argument.

use crate::abi::*;
use crate::dev::*;
use crate::fp::fp8_scale;
use crate::ptx::*;
use crate::sync::*;

/// Vectors in flight per lane in the BF16 row copies and the combine reduction.
const UNROLL: usize = 4;
/// Vectors per work unit (one warp) of the combine halves.
const CHUNK: u32 = 32 * UNROLL as u32;

/// Send half (every block) and receive half (block 0), as `stages` says. One warp per token.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ll_dispatch(p: LlDispatchParams) {
    let w = Waiter::new(&p.wait);
    let (world, rank) = (w.world, w.rank);
    // SAFETY: shapes validated by the host; heap offsets from the buffer's layout.
    unsafe {
        if p.stages & stage::SEND != 0 {
            dispatch_send(&p, &w);
            signal_all_ranks(&w, |r| &raw mut (*control(&p.peers, r)).ll_dispatch_arrive[p.half as usize][rank as usize]);
        }
        if p.stages & stage::RECV != 0 && ctaid_x() == 0 {
            let me = control(&p.peers, rank);
            let ok =
                wait_all_sources(&w, |s| &raw const (*me).ll_dispatch_arrive[p.half as usize][s as usize], p.send_blocks, phase::LL_DISPATCH_RECV);
            if ok && tid_x() < world {
                st_relaxed_sys_global_u32(&raw mut (*me).ll_dispatch_arrive[p.half as usize][tid_x() as usize], 0);
            }
            let hb = peer_base(&p.peers, rank) + p.half_off;
            let mut j = tid_x();
            while j < p.experts_per_rank {
                let counter = (hb + p.layout.slot_counter + 4 * j as u64) as *mut u32;
                let c = core::cmp::min(ld_relaxed_sys_global_u32(counter), world * p.max_tokens);
                st_global_u32((hb + p.layout.recv_count + 4 * j as u64) as *mut u32, c);
                if p.stats != 0 {
                    red_relaxed_gpu_global_add_s32((p.stats as *mut i32).add(j as usize), c as i32);
                }
                st_relaxed_sys_global_u32(counter, 0);
                j += ntid_x();
            }
        }
    }
}

/// Each block takes a contiguous share of the tokens, `warps` at a time. Phase 1: warp `w`
/// reserves the rows of token `base + w` (one remote atomic per top-k slot) and leaves their
/// addresses in shared memory. Phase 2: the whole block streams each of those tokens, every
/// thread one 16-byte vector (8 channels; 16 threads form a 128-channel FP8 group), to every
/// reserved row.
unsafe fn dispatch_send(p: &LlDispatchParams, w: &Waiter) {
    let (tid, nt, lane) = (tid_x(), ntid_x(), laneid());
    let (warp, warps) = (tid / 32, nt / 32);
    let (world, rank) = (w.world, w.rank);
    let k = p.k as usize;
    let epr = p.experts_per_rank as i64;
    let num_experts = epr * world as i64;
    let rows_per_expert = (world * p.max_tokens) as u64;
    let fp8 = p.fp8 != 0;
    let row_bytes = if fp8 { p.hidden as u64 } else { 2 * p.hidden as u64 };
    let is64 = p.idx_i64 != 0;
    let nvec = p.hidden / 8;
    let smem = dyn_smem_base();
    let dst_at = |wi: u32, kk: u32| smem + (wi * MAX_TOPK as u32 + kk) * 8;
    let scale_at = |wi: u32, kk: u32| smem + (warps * MAX_TOPK as u32 + wi * MAX_TOPK as u32 + kk) * 8;
    let mask_at = |wi: u32| smem + 16 * warps * MAX_TOPK as u32 + 4 * wi;
    let per_block = p.num_tokens.div_ceil(nctaid_x());
    let t0 = core::cmp::min(ctaid_x() * per_block, p.num_tokens);
    let t1 = core::cmp::min(t0 + per_block, p.num_tokens);
    // SAFETY: as in `ll_dispatch`; shared memory holds `ll_dispatch_smem_bytes(warps)`.
    unsafe {
        let mut base = t0;
        while base < t1 {
            // Phase 1: reservations, one token per warp.
            let t = base + warp;
            let mut kmask = 0;
            if t < t1 {
                let e = if (lane as usize) < k { load_topk_idx(p.topk_idx, t as usize * k + lane as usize, is64) } else { -1 };
                if (lane as usize) < k && (e < -1 || e >= num_experts) {
                    w.report(status::BAD_EXPERT, phase::LL_DISPATCH_SEND, t, num_experts as u64, e as u64, 0);
                }
                let mut valid = e >= 0 && e < num_experts;
                let (mut dst, mut dst_scale) = (0u64, 0u64);
                if valid {
                    let (dr, el) = ((e / epr) as u32, (e % epr) as u64);
                    let hb = peer_base(&p.peers, dr) + p.half_off;
                    let slot = atom_relaxed_sys_global_add_u32((hb + p.layout.slot_counter + 4 * el) as *mut u32, 1) as u64;
                    if slot >= rows_per_expert {
                        w.report(status::CAPACITY, phase::LL_DISPATCH_SEND, dr, rows_per_expert, slot + 1, 0);
                        valid = false;
                    } else {
                        let row = el * rows_per_expert + slot;
                        st_global_u32((hb + p.layout.recv_meta + 4 * row) as *mut u32, rank << 24 | lane << 16 | t);
                        dst = hb + p.layout.recv_x + row * row_bytes;
                        dst_scale = hb + p.layout.recv_scales + row * p.scale_row_bytes as u64;
                    }
                }
                kmask = vote_sync_ballot_b32(FULL, valid);
                if (lane as usize) < MAX_TOPK {
                    st_shared_cta_v2_u32(dst_at(warp, lane), [dst as u32, (dst >> 32) as u32]);
                    st_shared_cta_v2_u32(scale_at(warp, lane), [dst_scale as u32, (dst_scale >> 32) as u32]);
                }
            }
            if lane == 0 {
                st_shared_cta_u32(mask_at(warp), kmask);
            }
            bar_sync_0();
            // Phase 2: the block streams each reserved token.
            let count = core::cmp::min(warps, t1 - base);
            for i in 0..count {
                let t = base + i;
                let kmask = ld_shared_cta_u32(mask_at(i));
                let src = p.x + t as u64 * 2 * p.hidden as u64;
                let mut j = tid;
                // Every thread runs the same number of passes (the group maximum needs whole warps).
                for _ in 0..nvec.div_ceil(nt) {
                    let active = j < nvec;
                    let v = if active { ld_global_nc_L1_no_allocate_v4_u32((src as *const [u32; 4]).add(j as usize)) } else { [0; 4] };
                    if fp8 {
                        let (q, sc) = quantize_bf16x8(v, p.scale_fmt);
                        let mut m = kmask;
                        while m != 0 {
                            let kk = m.trailing_zeros();
                            m &= m - 1;
                            if active {
                                let d = ld_shared_u64(dst_at(i, kk));
                                st_global_v2_u32((d as *mut [u32; 2]).add(j as usize), q);
                                if lane % 16 == 0 {
                                    let g = (j / 16) as u64;
                                    let ds = ld_shared_u64(scale_at(i, kk));
                                    if p.scale_fmt == scale_fmt::UE8M0 {
                                        st_global_u8((ds + g) as *mut u8, sc.ue8m0);
                                    } else {
                                        st_global_u32((ds + 4 * g) as *mut u32, sc.scale.to_bits());
                                    }
                                }
                            }
                        }
                    } else if active {
                        let mut m = kmask;
                        while m != 0 {
                            let kk = m.trailing_zeros();
                            m &= m - 1;
                            let d = ld_shared_u64(dst_at(i, kk));
                            st_global_L1_no_allocate_v4_u32((d as *mut [u32; 4]).add(j as usize), v);
                        }
                    }
                    j += nt;
                }
            }
            bar_sync_0();
            base += warps;
        }
    }
}

/// Reads a u64 from shared memory (two words).
#[inline(always)]
unsafe fn ld_shared_u64(a: u32) -> u64 {
    // SAFETY: the caller passes an 8-byte slot it wrote.
    unsafe { ld_shared_cta_u32(a) as u64 | (ld_shared_cta_u32(a + 4) as u64) << 32 }
}

/// Casts 8 bf16 channels to FP8 e4m3; the scale covers the 128 channels of the 16-lane group
/// (every lane of the warp must call it).
#[inline(always)]
fn quantize_bf16x8(v: [u32; 4], fmt: u32) -> ([u32; 2], crate::fp::Fp8Scale) {
    let mut f = [0f32; 8];
    let mut amax = 0f32;
    for i in 0..4 {
        let (a, b) = unpack_bf16x2(v[i]);
        f[2 * i] = a;
        f[2 * i + 1] = b;
        amax = max_f32(amax, max_f32(abs_f32(a), abs_f32(b)));
    }
    let sc = fp8_scale(group_max_f32(amax, 16), fmt);
    let mut q = [0u32; 2];
    for i in 0..4 {
        let pair = cvt_rn_satfinite_e4m3x2_f32(mul_rn_f32(f[2 * i + 1], sc.inv), mul_rn_f32(f[2 * i], sc.inv)) as u32;
        q[i / 2] |= pair << (16 * (i % 2));
    }
    (q, sc)
}

/// Send half (every block: each received row back to its home) and receive half (every
/// block: its share of this rank's tokens), as `stages` says.
/// Dynamic shared memory: `4 * (E_local + 1) + 128` bytes (prefix of the counts, scan scratch).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ll_combine(p: LlCombineParams) {
    let w = Waiter::new(&p.wait);
    let rank = w.rank;
    // SAFETY: shapes validated by the host; heap offsets from the buffer's layout.
    unsafe {
        if p.stages & stage::SEND != 0 {
            combine_send(&p, &w);
            signal_all_ranks(&w, |r| &raw mut (*control(&p.peers, r)).ll_combine_arrive[p.half as usize][rank as usize]);
        }
        if p.stages & stage::RECV != 0 {
            let me = control(&p.peers, rank);
            let ok = wait_all_sources(&w, |s| &raw const (*me).ll_combine_arrive[p.half as usize][s as usize], p.send_blocks, phase::LL_COMBINE_RECV);
            if ok {
                combine_reduce(&p);
            }
            if last_block_done(&raw mut (*me).ll_combine_done[p.half as usize]) && ok {
                for s in 0..w.world {
                    st_relaxed_sys_global_u32(&raw mut (*me).ll_combine_arrive[p.half as usize][s as usize], 0);
                }
            }
        }
    }
}

unsafe fn combine_send(p: &LlCombineParams, w: &Waiter) {
    let (world, rank) = (w.world, w.rank);
    let (tid, nt) = (tid_x(), ntid_x());
    let warps = nt / 32;
    let gw = ctaid_x() * warps + tid / 32;
    let total_warps = nctaid_x() * warps;
    let epr = p.experts_per_rank;
    let rows_per_expert = (world * p.max_tokens) as u64;
    let row_bytes = 2 * p.hidden as u64;
    let k = p.k as u64;
    let dh = peer_base(&p.peers, rank) + p.dispatch_half_off;
    let prefix = dyn_smem_base();
    // SAFETY: as in `ll_combine`; shared memory holds `epr + 1` words.
    unsafe {
        // Exclusive prefix of the received counts, one pass per block-sized chunk.
        let mut carry = 0u32;
        let mut j0 = 0u32;
        while j0 < epr {
            let j = j0 + tid;
            let c = if j < epr { ld_global_nc_s32((dh + p.layout.recv_count + 4 * j as u64) as *const i32) as u32 } else { 0 };
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
        // Work unit: (row, chunk of CHUNK vectors), one per warp.
        let chunks = (p.hidden / 8).div_ceil(CHUNK);
        let mut unit = gw;
        while unit < total_rows * chunks {
            let (i, c) = (unit / chunks, unit % chunks);
            // Largest expert e with prefix[e] <= i.
            let (mut lo, mut hi) = (0u32, epr);
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if ld_shared_cta_u32(prefix + 4 * mid) <= i {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let e = lo;
            let row = e as u64 * rows_per_expert + (i - ld_shared_cta_u32(prefix + 4 * e)) as u64;
            let meta = ld_global_nc_s32((dh + p.layout.recv_meta + 4 * row) as *const i32) as u32;
            let (s, kk, t) = (meta >> 24, ((meta >> 16) & 0xff) as u64, (meta & 0xffff) as u64);
            let off = c as u64 * CHUNK as u64 * 16;
            let n = core::cmp::min(CHUNK, p.hidden / 8 - c * CHUNK);
            let dst = peer_base(&p.peers, s) + p.combine_half_off + p.layout.comb_x + (t * p.slot_k as u64 + kk) * row_bytes + off;
            warp_copy_to_lane_dests::<UNROLL>(p.y + row * row_bytes + off, n, dst, 1);
            unit += total_warps;
        }
    }
}

unsafe fn combine_reduce(p: &LlCombineParams) {
    let lane = laneid();
    let warps = ntid_x() / 32;
    let gw = ctaid_x() * warps + tid_x() / 32;
    let total_warps = nctaid_x() * warps;
    let k = p.k as usize;
    let num_experts = p.experts_per_rank as i64 * p.wait.world as i64;
    let row_bytes = 2 * p.hidden as u64;
    let nvec = p.hidden / 8;
    let chunks = nvec.div_ceil(CHUNK);
    let ch = peer_base(&p.peers, p.wait.rank) + p.combine_half_off + p.layout.comb_x;
    let is64 = p.idx_i64 != 0;
    // SAFETY: as in `ll_combine`.
    unsafe {
        // Work unit: (token, chunk of CHUNK vectors), one per warp; slots outermost, in order.
        let mut unit = gw;
        while unit < p.num_tokens * chunks {
            let (t, c) = (unit / chunks, unit % chunks);
            let (e, wt) = if (lane as usize) < k {
                let i = t as usize * k + lane as usize;
                (load_topk_idx(p.topk_idx, i, is64), ld_global_nc_f32((p.topk_weights as *const f32).add(i)))
            } else {
                (-1, 0.0)
            };
            let kmask = vote_sync_ballot_b32(FULL, e >= 0 && e < num_experts);
            let end = core::cmp::min(nvec, (c + 1) * CHUNK);
            let mut base = c * CHUNK;
            while base < end {
                let mut acc = [[0f32; 8]; UNROLL];
                let mut m = kmask;
                while m != 0 {
                    let kk = m.trailing_zeros();
                    m &= m - 1;
                    let wk = f32::from_bits(shfl_sync_idx_b32(FULL, wt.to_bits(), kk));
                    let row = (ch + (t as u64 * p.slot_k as u64 + kk as u64) * row_bytes) as *const [u32; 4];
                    let mut v = [[0u32; 4]; UNROLL];
                    for (u, vu) in v.iter_mut().enumerate() {
                        let j = base + lane + 32 * u as u32;
                        if j < end {
                            *vu = ld_global_v4_u32(row.add(j as usize));
                        }
                    }
                    for (u, a) in acc.iter_mut().enumerate() {
                        for q in 0..4 {
                            let (x0, x1) = unpack_bf16x2(v[u][q]);
                            a[2 * q] = fma_rn_f32(wk, x0, a[2 * q]);
                            a[2 * q + 1] = fma_rn_f32(wk, x1, a[2 * q + 1]);
                        }
                    }
                }
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
