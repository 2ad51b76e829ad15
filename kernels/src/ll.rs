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

/// Vectors in flight per lane in the BF16 row copies.
const UNROLL: usize = 4;

/// Send half (every block) and receive half (block 0), as `stages` says. One warp per token.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ll_dispatch(p: LlDispatchParams) {
    let w = Waiter::new(&p.wait);
    let (lane, world, rank) = (laneid(), w.world, w.rank);
    // SAFETY: shapes validated by the host; heap offsets from the buffer's layout.
    unsafe {
        if p.stages & stage::SEND != 0 {
            dispatch_send(&p, &w);
            signal_all_ranks(&w, |r| &raw mut (*control(&p.peers, r)).ll_dispatch_arrive[p.half as usize][rank as usize]);
        }
        if p.stages & stage::RECV != 0 && ctaid_x() == 0 {
            let me = control(&p.peers, rank);
            let ok = wait_all_sources(&w, |s| &raw const (*me).ll_dispatch_arrive[p.half as usize][s as usize], p.send_blocks, phase::LL_DISPATCH_RECV);
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
        let _ = lane;
    }
}

unsafe fn dispatch_send(p: &LlDispatchParams, w: &Waiter) {
    let (lane, world, rank) = (laneid(), w.world, w.rank);
    let warps = ntid_x() / 32;
    let gw = ctaid_x() * warps + tid_x() / 32;
    let total_warps = nctaid_x() * warps;
    let k = p.k as usize;
    let epr = p.experts_per_rank as i64;
    let num_experts = epr * world as i64;
    let rows_per_expert = (world * p.max_tokens) as u64;
    let fp8 = p.fp8 != 0;
    let row_bytes = if fp8 { p.hidden as u64 } else { 2 * p.hidden as u64 };
    let is64 = p.idx_i64 != 0;
    // SAFETY: as in `ll_dispatch`.
    unsafe {
        let mut t = gw;
        while t < p.num_tokens {
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
            let kmask = vote_sync_ballot_b32(FULL, valid);
            let src = p.x + t as u64 * 2 * p.hidden as u64;
            if fp8 {
                quantize_to_lane_dests(src, p.hidden, p.scale_fmt, dst, dst_scale, kmask);
            } else {
                warp_copy_to_lane_dests::<UNROLL>(src, p.hidden / 8, dst, kmask);
            }
            t += total_warps;
        }
    }
}

/// The warp casts one BF16 row of `hidden` channels to FP8 e4m3 (one scale per 128 channels:
/// 16 lanes of 8 channels each) and stores it and the scales to the destination of every lane
/// in `mask` (lane `d` holds its row address `dst` and scale-row address `dst_scale`).
#[inline(always)]
unsafe fn quantize_to_lane_dests(src: u64, hidden: u32, fmt: u32, dst: u64, dst_scale: u64, mask: u32) {
    let lane = laneid();
    let nvec = hidden / 8;
    let mut base = 0u32;
    // SAFETY: the caller guarantees the row and destinations hold `hidden` channels.
    unsafe {
        while base < nvec {
            let j = base + lane;
            let active = j < nvec;
            let v = if active { ld_global_nc_L1_no_allocate_v4_u32((src as *const [u32; 4]).add(j as usize)) } else { [0; 4] };
            let mut f = [0f32; 8];
            let mut amax = 0f32;
            for i in 0..4 {
                let (a, b) = unpack_bf16x2(v[i]);
                f[2 * i] = a;
                f[2 * i + 1] = b;
                amax = max_f32(amax, max_f32(abs_f32(a), abs_f32(b)));
            }
            let amax = group_max_f32(amax, 16);
            let sc = fp8_scale(amax, fmt);
            let mut q = [0u32; 2];
            for i in 0..4 {
                let pair = cvt_rn_satfinite_e4m3x2_f32(mul_rn_f32(f[2 * i + 1], sc.inv), mul_rn_f32(f[2 * i], sc.inv)) as u32;
                q[i / 2] |= pair << (16 * (i % 2));
            }
            let g = (j / 16) as u64;
            let mut m = mask;
            while m != 0 {
                let d = m.trailing_zeros();
                m &= m - 1;
                let out = shfl_idx_u64(FULL, dst, d);
                let out_scale = shfl_idx_u64(FULL, dst_scale, d);
                if active {
                    st_global_v2_u32((out as *mut [u32; 2]).add(j as usize), q);
                    if lane % 16 == 0 {
                        if fmt == scale_fmt::UE8M0 {
                            st_global_u8((out_scale + g) as *mut u8, sc.ue8m0);
                        } else {
                            st_global_u32((out_scale + 4 * g) as *mut u32, sc.scale.to_bits());
                        }
                    }
                }
            }
            base += 32;
        }
    }
}

/// Send half (every block: each received row back to its home) and receive half (every
/// block: its share of this rank's tokens), as `stages` says.
/// Dynamic shared memory: `4 * (E_local + 1)` bytes.
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
    let (lane, world, rank) = (laneid(), w.world, w.rank);
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
        let mut i = gw;
        while i < total_rows {
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
            let dst = peer_base(&p.peers, s) + p.combine_half_off + p.layout.comb_x + (t * k + kk) * row_bytes;
            warp_copy_to_lane_dests::<UNROLL>(p.y + row * row_bytes, p.hidden / 8, dst, 1);
            i += total_warps;
        }
        let _ = lane;
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
    let ch = peer_base(&p.peers, p.wait.rank) + p.combine_half_off + p.layout.comb_x;
    let is64 = p.idx_i64 != 0;
    // SAFETY: as in `ll_combine`.
    unsafe {
        let mut t = gw;
        while t < p.num_tokens {
            let (e, wt) = if (lane as usize) < k {
                let i = t as usize * k + lane as usize;
                (load_topk_idx(p.topk_idx, i, is64), ld_global_nc_f32((p.topk_weights as *const f32).add(i)))
            } else {
                (-1, 0.0)
            };
            let kmask = vote_sync_ballot_b32(FULL, e >= 0 && e < num_experts);
            let mut base = 0u32;
            while base < nvec {
                let j = base + lane;
                let mut acc = [0f32; 8];
                let mut m = kmask;
                while m != 0 {
                    let kk = m.trailing_zeros();
                    m &= m - 1;
                    let wk = f32::from_bits(shfl_sync_idx_b32(FULL, wt.to_bits(), kk));
                    if j < nvec {
                        let a = ch + (t as u64 * k as u64 + kk as u64) * row_bytes + j as u64 * 16;
                        let v = ld_global_v4_u32(a as *const [u32; 4]);
                        for i in 0..4 {
                            let (x0, x1) = unpack_bf16x2(v[i]);
                            acc[2 * i] = fma_rn_f32(wk, x0, acc[2 * i]);
                            acc[2 * i + 1] = fma_rn_f32(wk, x1, acc[2 * i + 1]);
                        }
                    }
                }
                if j < nvec {
                    st_global_v4_u32((p.out + t as u64 * row_bytes + j as u64 * 16) as *mut [u32; 4], pack_bf16x8(&acc));
                }
                base += 32;
            }
            t += total_warps;
        }
    }
}
