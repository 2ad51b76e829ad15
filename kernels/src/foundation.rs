//! Foundation kernels: the cross-rank barrier, heap pattern checks, P2P bandwidth and flag
//! latency probes, the deadline test and the device-layer self-test.
use crate::abi::{BULK_CHUNK, BULK_STAGES, BarrierParams, P2pCopyParams, PatternParams, PingPongParams, WaitTestParams, pattern_word, phase};
use crate::dev::{div_rem_u64, peer_base, warp_sum_u32};
use crate::ptx::{
    atom_relaxed_sys_global_add_u32, bar_red_and_pred_0, cp_async_bulk_commit_group, cp_async_bulk_global_shared_cta_bulk_group,
    cp_async_bulk_shared_cluster_global_mbarrier_complete_tx_bytes, cp_async_bulk_wait_group, cp_async_bulk_wait_group_read, ctaid_x, dyn_smem_base,
    fence_proxy_async_shared_cta, globaltimer, laneid, ld_global_nc_L1_no_allocate_v4_u32, ld_relaxed_sys_global_u32,
    mbarrier_arrive_expect_tx_shared_cta_b64, mbarrier_init_shared_cta_b64, mbarrier_try_wait_parity_shared_cta_b64, nctaid_x, ntid_x,
    st_global_L1_no_allocate_v4_u32, st_global_u32, st_relaxed_sys_global_u64, st_release_sys_global_u32, tid_x,
};
use crate::sync::{Waiter, barrier_block, control, rank_slot, signal_all_ranks};

/// `iters` cross-rank barriers in a row, after waiting `hold_ns` (bounded: at most about 4.3 s).
/// One block (any number of warps: each thread serves every `blockDim`-th rank).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn barrier(p: BarrierParams) {
    let w = Waiter::new(&p.wait);
    if p.hold_ns != 0 && tid_x() == 0 {
        let start = globaltimer();
        while globaltimer().wrapping_sub(start) < p.hold_ns as u64 {}
    }
    for _ in 0..p.iters {
        // SAFETY: the host passes the heap's rank table (an entry per rank) and its slots.
        if !unsafe { barrier_block(p.ranks, p.slots, &w) } {
            return;
        }
    }
}

/// Writes this rank's pattern into slot `rank` of every peer's region, then signals every peer.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn heap_pattern_write(p: PatternParams) {
    let w = Waiter::new(&p.wait);
    let words = (p.slot_bytes / 4) as u32;
    let stride = nctaid_x() * ntid_x();
    for r in 0..w.world {
        let dst = (peer_base(&p.peers, r) + p.region_off + w.rank as u64 * p.slot_bytes) as *mut u32;
        let mut i = ctaid_x() * ntid_x() + tid_x();
        while i < words {
            // SAFETY: the slot lies inside every peer's heap (the host sized the region).
            unsafe { st_global_u32(dst.add(i as usize), pattern_word(p.seed, w.rank, i)) };
            i += stride;
        }
    }
    // SAFETY: `test_flags[rank]` is in every peer's control block.
    unsafe { signal_all_ranks(&w, |r| rank_slot(&raw mut (*control(&p.peers, r)).test_flags, w.rank)) };
}

/// Waits for every source's signal, then counts words that differ from the source's pattern.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn heap_pattern_check(p: PatternParams) {
    let w = Waiter::new(&p.wait);
    let me = control(&p.peers, w.rank);
    let tid = tid_x();
    let mut ok = true;
    if tid < w.world {
        // SAFETY: own control block.
        ok = unsafe { w.wait_reached(rank_slot(&raw mut (*me).test_flags, tid), p.signal, phase::TEST_SIGNAL, tid) };
    }
    // Every thread learns the outcome, so whole warps leave together (the warp sums below
    // need all 32 lanes).
    if !bar_red_and_pred_0(ok) {
        // The timeout is reported; the host turns it into an error before any count.
        return;
    }
    let words = (p.slot_bytes / 4) as u32;
    let stride = nctaid_x() * ntid_x();
    for s in 0..w.world {
        let src = (peer_base(&p.peers, w.rank) + p.region_off + s as u64 * p.slot_bytes) as *const u32;
        let mut bad = 0u32;
        let mut i = ctaid_x() * ntid_x() + tid;
        while i < words {
            // SAFETY: own heap region; peers' writes were acquired above.
            let v = unsafe { ld_relaxed_sys_global_u32(src.add(i as usize)) };
            if v != pattern_word(p.seed, s, i) {
                bad += 1;
            }
            i += stride;
        }
        let bad = warp_sum_u32(bad);
        if laneid() == 0 && bad != 0 {
            // SAFETY: the host allocates `world` counters.
            unsafe { atom_relaxed_sys_global_add_u32((p.mismatches as *mut u32).add(s as usize), bad) };
        }
    }
}

/// Streams `bytes` from `src` to `dst` (a peer's memory) `iters` times, either with 16-byte
/// stores from registers or, with `use_bulk`, through shared memory with `cp.async.bulk`.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn p2p_copy(p: P2pCopyParams) {
    for _ in 0..p.iters {
        if p.use_bulk != 0 {
            // SAFETY: the launcher gives BULK_STAGES * BULK_CHUNK bytes of shared memory.
            unsafe { copy_bulk(p.src, p.dst, p.bytes) };
        } else {
            // SAFETY: the host passes valid buffers of `bytes` bytes, 16-byte aligned.
            unsafe { copy_registers(p.src, p.dst, p.bytes) };
        }
    }
}

/// Vectors in flight per thread in [`copy_registers`].
const UNROLL: u64 = 4;

unsafe fn copy_registers(src: u64, dst: u64, bytes: u64) {
    let nvec = bytes / 16;
    let threads = (nctaid_x() * ntid_x()) as u64;
    let mut i = (ctaid_x() * ntid_x() + tid_x()) as u64;
    let s = src as *const [u32; 4];
    let d = dst as *mut [u32; 4];
    while i < nvec {
        let mut v = [[0u32; 4]; UNROLL as usize];
        for u in 0..UNROLL {
            let j = i + u * threads;
            if j < nvec {
                // SAFETY: j < nvec.
                v[u as usize] = unsafe { ld_global_nc_L1_no_allocate_v4_u32(s.add(j as usize)) };
            }
        }
        for u in 0..UNROLL {
            let j = i + u * threads;
            if j < nvec {
                // SAFETY: j < nvec.
                unsafe { st_global_L1_no_allocate_v4_u32(d.add(j as usize), v[u as usize]) };
            }
        }
        i += UNROLL * threads;
    }
}

/// One thread per block: global -> shared (mbarrier) -> global with bulk copies, pipelined
/// over [`BULK_STAGES`] stages. The block's share is a contiguous range of chunks.
unsafe fn copy_bulk(src: u64, dst: u64, bytes: u64) {
    if tid_x() != 0 {
        return;
    }
    let chunks = bytes.div_ceil(BULK_CHUNK as u64);
    let per_block = div_rem_u64(chunks + nctaid_x() as u64 - 1, nctaid_x() as u64).0;
    let first = ctaid_x() as u64 * per_block;
    let last = core::cmp::min(first + per_block, chunks);
    if first >= last {
        return;
    }
    let n = last - first;
    let smem = dyn_smem_base();
    let bars = smem + BULK_STAGES * BULK_CHUNK;
    let chunk_len = |c: u64| -> u32 { core::cmp::min(BULK_CHUNK as u64, bytes - c * BULK_CHUNK as u64) as u32 };
    // SAFETY: shared addresses lie inside the launch's dynamic shared memory; global
    // addresses inside the caller's buffers.
    unsafe {
        for s in 0..BULK_STAGES {
            mbarrier_init_shared_cta_b64(bars + 8 * s, 1);
        }
        fence_proxy_async_shared_cta();
        let load = |i: u64| {
            let s = (i % BULK_STAGES as u64) as u32;
            let c = first + i;
            let len = chunk_len(c);
            mbarrier_arrive_expect_tx_shared_cta_b64(bars + 8 * s, len);
            cp_async_bulk_shared_cluster_global_mbarrier_complete_tx_bytes(
                smem + s * BULK_CHUNK,
                (src + c * BULK_CHUNK as u64) as *const u8,
                len,
                bars + 8 * s,
            );
        };
        for i in 0..core::cmp::min(n, BULK_STAGES as u64) {
            load(i);
        }
        for i in 0..n {
            let s = (i % BULK_STAGES as u64) as u32;
            let parity = ((i / BULK_STAGES as u64) & 1) as u32;
            while !mbarrier_try_wait_parity_shared_cta_b64(bars + 8 * s, parity) {}
            let c = first + i;
            cp_async_bulk_global_shared_cta_bulk_group((dst + c * BULK_CHUNK as u64) as *mut u8, smem + s * BULK_CHUNK, chunk_len(c));
            cp_async_bulk_commit_group();
            if i + (BULK_STAGES as u64) < n {
                cp_async_bulk_wait_group_read::<0>();
                load(i + BULK_STAGES as u64);
            }
        }
        cp_async_bulk_wait_group::<0>();
    }
}

/// One thread: `iters` flag round trips with `peer` (`st.release.sys` there, `ld.acquire.sys`
/// here). The initiator writes the elapsed nanoseconds.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ping_pong(p: PingPongParams) {
    if tid_x() != 0 || ctaid_x() != 0 {
        return;
    }
    let w = Waiter::new(&p.wait);
    let me = control(&p.peers, w.rank);
    let peer = control(&p.peers, p.peer);
    // SAFETY: control blocks of this rank and the peer are valid heap memory.
    unsafe {
        let mine = rank_slot(&raw mut (*me).ping_flags, p.peer);
        let theirs = rank_slot(&raw mut (*peer).ping_flags, w.rank);
        let start = globaltimer();
        for i in 1..=p.iters {
            if p.initiator != 0 {
                st_release_sys_global_u32(theirs, i);
                if !w.wait_eq(mine, i, phase::PING_PONG, p.peer) {
                    return;
                }
            } else {
                if !w.wait_eq(mine, i, phase::PING_PONG, p.peer) {
                    return;
                }
                st_release_sys_global_u32(theirs, i);
            }
        }
        if p.initiator != 0 {
            st_relaxed_sys_global_u64(p.elapsed_ns as *mut u64, globaltimer() - start);
        }
    }
}

/// Waits for a test flag that no peer writes; must end with a timeout record.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn wait_forever(p: WaitTestParams) {
    let w = Waiter::new(&p.wait);
    let me = control(&p.peers, w.rank);
    if tid_x() == 0 {
        // SAFETY: own control block.
        unsafe { w.wait_reached(rank_slot(&raw mut (*me).test_flags, p.peer), p.value, phase::TEST_SIGNAL, p.peer) };
    }
}
