//! Device helpers built from the PTX wrappers: peer addressing, warp reductions and scans,
//! bf16 packing, index loads. Nothing here is a single instruction; see [`crate::ptx`] for those.

use crate::abi::{MAX_RANKS, Peers};
use crate::ptx::{
    add_rn_f32, bar_sync_0, ctaid_x, cvt_rn_bf16x2_f32, laneid, ld_global_nc_L1_no_allocate_v4_u32, ld_global_nc_s32, ld_global_nc_s64,
    ld_global_nc_v4_u32, ld_global_v4_u32, ld_shared_cta_u32, max_f32, nctaid_x, ntid_x, shfl_sync_bfly_b32, shfl_sync_idx_b32, shfl_sync_up_b32,
    st_global_L1_no_allocate_v4_u32, st_shared_cta_u32, tid_x,
};

/// All 32 lanes.
pub const FULL: u32 = 0xffff_ffff;

/// Heap base of rank `r`. Unrolled over [`MAX_RANKS`] so the table stays in the parameter
/// space (a run-time index into a by-value parameter would copy it to local memory).
#[inline(always)]
pub fn peer_base(peers: &Peers, r: u32) -> u64 {
    let mut v = 0;
    for i in 0..MAX_RANKS {
        if r == i as u32 {
            v = peers.base[i];
        }
    }
    v
}

/// This warp's index among the grid's warps with blocks interleaved (warp `w` of block `b` is
/// `w * blocks + b`), so consecutive work units land on different SMs: a light load (fewer
/// units than warps) spreads over every SM instead of filling the first few.
#[inline(always)]
pub fn grid_warp_interleaved() -> u32 {
    (tid_x() / 32) * nctaid_x() + ctaid_x()
}

/// `(a / b, a % b)` for a divisor the host guarantees non-zero. Rust's `/` checks for zero and
/// panics, and a panic compiles to `trap`, which poisons the whole CUDA context; a zero divisor
/// gives `(0, 0)` here instead.
#[inline(always)]
pub fn div_rem_u32(a: u32, b: u32) -> (u32, u32) {
    if b == 0 { (0, 0) } else { (a / b, a % b) }
}

/// [`div_rem_u32`] for u64.
#[inline(always)]
pub fn div_rem_u64(a: u64, b: u64) -> (u64, u64) {
    if b == 0 { (0, 0) } else { (a / b, a % b) }
}

/// `a.div_ceil(b)` for a divisor the host guarantees non-zero (0 for a zero divisor; see
/// [`div_rem_u32`]).
#[inline(always)]
pub fn div_ceil_u32(a: u32, b: u32) -> u32 {
    if b == 0 { 0 } else { a.div_ceil(b) }
}

/// 64-bit `shfl.sync.idx`.
#[inline(always)]
pub fn shfl_idx_u64(mask: u32, v: u64, src: u32) -> u64 {
    let lo = shfl_sync_idx_b32(mask, v as u32, src);
    let hi = shfl_sync_idx_b32(mask, (v >> 32) as u32, src);
    (hi as u64) << 32 | lo as u64
}

/// Maximum over groups of `width` consecutive lanes (a power of two up to 32).
#[inline(always)]
pub fn group_max_f32(v: f32, width: u32) -> f32 {
    let mut m = v;
    let mut s = 1;
    while s < width {
        m = max_f32(m, f32::from_bits(shfl_sync_bfly_b32(FULL, m.to_bits(), s)));
        s <<= 1;
    }
    m
}

/// Sum over the warp (every lane gets it).
#[inline(always)]
pub fn warp_sum_u32(v: u32) -> u32 {
    let mut s = v;
    let mut d = 1;
    while d < 32 {
        s = s.wrapping_add(shfl_sync_bfly_b32(FULL, s, d));
        d <<= 1;
    }
    s
}

/// Inclusive prefix sum over the warp.
#[inline(always)]
pub fn warp_inclusive_scan_u32(v: u32) -> u32 {
    let lane = laneid();
    let mut s = v;
    let mut d = 1;
    while d < 32 {
        let o = shfl_sync_up_b32(FULL, s, d);
        if lane >= d {
            s = s.wrapping_add(o);
        }
        d <<= 1;
    }
    s
}

/// Exclusive prefix sum over the whole block (at most 1024 threads). Uses 32 words of shared
/// memory at `smem`; returns (exclusive prefix of this thread, block total).
///
/// # Safety
/// `smem` must be 32 free, aligned words of shared memory; all threads must call it.
#[inline(always)]
pub unsafe fn block_exclusive_scan_u32(v: u32, smem: u32) -> (u32, u32) {
    let lane = laneid();
    let warp = tid_x() / 32;
    let nwarps = ntid_x().div_ceil(32);
    let incl = warp_inclusive_scan_u32(v);
    if lane == 31 {
        // SAFETY: `smem` holds 32 words, one per warp.
        unsafe { st_shared_cta_u32(smem + 4 * warp, incl) };
    }
    bar_sync_0();
    let mut warp_prefix = 0u32;
    let mut total = 0u32;
    for w in 0..nwarps {
        // SAFETY: written above, before the barrier.
        let s = unsafe { ld_shared_cta_u32(smem + 4 * w) };
        if w < warp {
            warp_prefix = warp_prefix.wrapping_add(s);
        }
        total = total.wrapping_add(s);
    }
    bar_sync_0();
    (warp_prefix.wrapping_add(incl).wrapping_sub(v), total)
}

/// Reads top-k entry `i` of an i32 or i64 index array (a kernel input).
///
/// # Safety
/// `p` must hold at least `i + 1` entries of the given width.
#[inline(always)]
pub unsafe fn load_topk_idx(p: u64, i: usize, is_i64: bool) -> i64 {
    // SAFETY: the caller guarantees the bounds.
    unsafe { if is_i64 { ld_global_nc_s64((p as *const i64).add(i)) } else { ld_global_nc_s32((p as *const i32).add(i)) as i64 } }
}

/// The two bf16 values packed in `w` (element 0 in the low half) as f32.
#[inline(always)]
pub fn unpack_bf16x2(w: u32) -> (f32, f32) {
    (f32::from_bits(w << 16), f32::from_bits(w & 0xffff_0000))
}

/// Adds the 8 bf16 values of a 16-byte vector to `acc` with IEEE adds.
#[inline(always)]
pub fn accumulate_bf16x8(acc: &mut [f32; 8], v: [u32; 4]) {
    for j in 0..4 {
        let (a, b) = unpack_bf16x2(v[j]);
        acc[2 * j] = add_rn_f32(acc[2 * j], a);
        acc[2 * j + 1] = add_rn_f32(acc[2 * j + 1], b);
    }
}

/// Packs 8 f32 into 8 bf16 (round to nearest even).
#[inline(always)]
pub fn pack_bf16x8(acc: &[f32; 8]) -> [u32; 4] {
    let mut o = [0u32; 4];
    for j in 0..4 {
        o[j] = cvt_rn_bf16x2_f32(acc[2 * j + 1], acc[2 * j]);
    }
    o
}

/// The warp copies `nvec` 16-byte vectors from `src` (a kernel input) to the destination
/// held by each lane whose bit is set in `mask` (lane `d` passes its own `dst`), `U` vectors
/// per lane in flight. Destinations travel by `shfl`, so no per-destination array exists
/// (an array indexed at run time would live in local memory).
///
/// # Safety
/// `src` and every selected lane's `dst` must hold `nvec` vectors, 16-byte aligned.
#[inline(always)]
pub unsafe fn warp_copy_to_lane_dests<const U: usize>(src: u64, nvec: u32, dst: u64, mask: u32) {
    let lane = laneid();
    let s = src as *const [u32; 4];
    let mut base = 0u32;
    while base < nvec {
        let mut v = [[0u32; 4]; U];
        for (u, vu) in v.iter_mut().enumerate() {
            let j = base + lane + 32 * u as u32;
            if j < nvec {
                // SAFETY: j < nvec.
                *vu = unsafe { ld_global_nc_L1_no_allocate_v4_u32(s.add(j as usize)) };
            }
        }
        let mut m = mask;
        while m != 0 {
            let d = m.trailing_zeros();
            m &= m - 1;
            let out = shfl_idx_u64(FULL, dst, d) as *mut [u32; 4];
            for (u, vu) in v.iter().enumerate() {
                let j = base + lane + 32 * u as u32;
                if j < nvec {
                    // SAFETY: j < nvec.
                    unsafe { st_global_L1_no_allocate_v4_u32(out.add(j as usize), *vu) };
                }
            }
        }
        base += 32 * U as u32;
    }
}

/// Loads row `row`'s vectors `base + lane + 32 u` (for `u < U`, those below `nvec`; zeros
/// elsewhere), all `U` loads issued before any use.
///
/// # Safety
/// `row` must hold `nvec` 16-byte vectors.
#[inline(always)]
pub unsafe fn load_row_vectors<const U: usize>(row: u64, base: u32, nvec: u32, load: unsafe fn(*const [u32; 4]) -> [u32; 4]) -> [[u32; 4]; U] {
    let lane = laneid();
    let mut v = [[0u32; 4]; U];
    for (u, vu) in v.iter_mut().enumerate() {
        let j = base + lane + 32 * u as u32;
        if j < nvec {
            // SAFETY: j < nvec.
            *vu = unsafe { load((row as *const [u32; 4]).add(j as usize)) };
        }
    }
    v
}

/// Adds the bf16 vectors [`load_row_vectors`] returned to `acc` (IEEE adds).
#[inline(always)]
pub fn add_row_vectors<const U: usize>(acc: &mut [[f32; 8]; U], v: &[[u32; 4]; U], base: u32, nvec: u32) {
    let lane = laneid();
    for (u, a) in acc.iter_mut().enumerate() {
        if base + lane + 32 * (u as u32) < nvec {
            accumulate_bf16x8(a, v[u]);
        }
    }
}

/// Adds row `row`'s vectors `base + lane + 32 u` (for `u < U`, those below `nvec`) to
/// `acc[u]`, issuing all `U` loads before the first add.
///
/// # Safety
/// `row` must hold `nvec` 16-byte vectors.
#[inline(always)]
pub unsafe fn accumulate_rows<const U: usize>(acc: &mut [[f32; 8]; U], row: u64, base: u32, nvec: u32, load: unsafe fn(*const [u32; 4]) -> [u32; 4]) {
    // SAFETY: forwarded.
    let v = unsafe { load_row_vectors::<U>(row, base, nvec, load) };
    add_row_vectors(acc, &v, base, nvec);
}

/// Sums into `acc`, in ascending bit order of `mask`, the rows `row(bit)`, two rows' loads in
/// flight at a time. Rows with `readonly(bit)` (kernel inputs) are read through the read-only
/// path, the others (written by peers during the kernel) with weak loads.
///
/// # Safety
/// Every `row(bit)` must hold `nvec` 16-byte vectors, and a `readonly` row must not be
/// written while the kernel runs.
#[inline(always)]
pub unsafe fn accumulate_rows_in_order<const U: usize>(
    acc: &mut [[f32; 8]; U],
    mask: u32,
    row: impl Fn(u32) -> u64,
    readonly: impl Fn(u32) -> bool,
    base: u32,
    nvec: u32,
) {
    let load = |r: u32| -> [[u32; 4]; U] {
        // SAFETY: the caller guarantees the rows.
        unsafe {
            if readonly(r) {
                load_row_vectors::<U>(row(r), base, nvec, ld_global_nc_v4_u32)
            } else {
                load_row_vectors::<U>(row(r), base, nvec, ld_global_v4_u32)
            }
        }
    };
    let mut m = mask;
    while m != 0 {
        let a = m.trailing_zeros();
        m &= m - 1;
        let va = load(a);
        if m != 0 {
            let b = m.trailing_zeros();
            m &= m - 1;
            let vb = load(b);
            add_row_vectors(acc, &va, base, nvec);
            add_row_vectors(acc, &vb, base, nvec);
        } else {
            add_row_vectors(acc, &va, base, nvec);
        }
    }
}
