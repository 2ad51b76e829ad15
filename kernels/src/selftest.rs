//! `ptx_selftest`: runs the device-layer wrappers on known inputs so a GPU test can check
//! each one's result (one block of 64 threads). Output word `i` is documented at its store;
//! the host test (`tests/tests/gpu_device_layer.rs`) holds the expected values.

use crate::abi::selftest_out as out;
use crate::abi::{SELFTEST_CVT_INPUTS, SelftestParams};
use crate::dev::{FULL, block_exclusive_scan_u32, group_max_f32, warp_sum_u32};
use crate::ptx::{
    abs_f32, add_rn_f32, atom_relaxed_gpu_global_add_u32, atom_relaxed_sys_global_add_u32, atom_relaxed_sys_global_cas_b32, atom_shared_cta_add_u32,
    bar_sync, bar_sync_0, bar_warp_sync, cp_async_bulk_commit_group, cp_async_bulk_global_shared_cta_bulk_group,
    cp_async_bulk_shared_cluster_global_mbarrier_complete_tx_bytes, cp_async_bulk_wait_group, cp_async_bulk_wait_group_read, cvt_f32_bf16,
    cvt_rn_bf16x2_f32, cvt_rn_satfinite_e4m3x2_f32, div_rn_f32, dyn_smem_base, dynamic_smem_size, elect_sync, fence_acq_rel_gpu,
    fence_proxy_async_global, fence_proxy_async_shared_cta, fence_sc_sys, fma_rn_f32, globaltimer, laneid, ld_acquire_gpu_global_u32,
    ld_acquire_sys_global_u32, ld_acquire_sys_global_u64, ld_global_nc_L1_no_allocate_v4_u32, ld_global_nc_f32, ld_global_nc_u16,
    ld_global_nc_v4_u32, ld_global_u32, ld_global_v4_u32, ld_relaxed_sys_global_s32, ld_relaxed_sys_global_u32, ld_shared_cta_u32,
    ld_shared_cta_v4_u32, ld_volatile_global_u32, max_f32, mbarrier_arrive_expect_tx_shared_cta_b64, mbarrier_init_shared_cta_b64,
    mbarrier_try_wait_parity_shared_cta_b64, mul_rn_f32, nanosleep_u32, nctaid_x, ntid_x, red_relaxed_gpu_global_add_s32,
    red_relaxed_sys_global_add_u32, red_release_sys_global_add_u32, shfl_sync_idx_b32, shfl_sync_up_b32, smid, st_global_L1_no_allocate_v4_u32,
    st_global_u8, st_global_u32, st_global_u64, st_global_v2_u32, st_global_v4_u32, st_relaxed_sys_global_u32, st_release_gpu_global_u32,
    st_release_sys_global_u32, st_shared_cta_u32, st_shared_cta_v2_u32, st_shared_cta_v4_u32, st_volatile_global_u32, tid_x, vote_sync_any_pred,
    vote_sync_ballot_b32,
};

/// Words of scratch each part uses.
const BULK_WORDS: usize = 256;

#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn ptx_selftest(p: SelftestParams) {
    let tid = tid_x();
    let lane = laneid();
    let o = p.out as *mut u32;
    let scratch = p.scratch as *mut u32;
    let smem = dyn_smem_base();
    // SAFETY: the host allocates SELFTEST_OUT_WORDS outputs, SELFTEST_SCRATCH_WORDS scratch
    // words (zeroed, words 64..64+BULK_WORDS filled with their index), SELFTEST_CVT_INPUTS
    // conversion inputs and outputs, and 8 KiB of dynamic shared memory.
    unsafe {
        let put = |i: usize, v: u32| st_global_u32(o.add(i), v);
        if tid == 0 {
            put(out::NTID, ntid_x());
            put(out::NCTAID, nctaid_x());
        }
        let ballot = vote_sync_ballot_b32(FULL, lane % 2 == 0);
        let idx = shfl_sync_idx_b32(FULL, lane * 3, 5);
        let sum = warp_sum_u32(lane);
        let any = vote_sync_any_pred(FULL, lane == 17);
        let up = shfl_sync_up_b32(FULL, lane, 1);
        let gmax = group_max_f32(lane as f32, 8);
        if tid == 0 {
            put(out::BALLOT_EVEN, ballot);
            put(out::SHFL_IDX, idx);
            put(out::WARP_SUM, sum);
            put(out::VOTE_ANY, any as u32);
            // Lane 9 sees lane 8's value.
            put(out::GROUP_MAX, gmax.to_bits());
        }
        if tid == 9 {
            put(out::SHFL_UP, up);
        }
        // Shared atomics: every thread adds its index to word 0; one elected lane per warp
        // adds 1 to word 1.
        if tid == 0 {
            st_shared_cta_u32(smem, 0);
            st_shared_cta_u32(smem + 4, 0);
        }
        bar_sync_0();
        atom_shared_cta_add_u32(smem, tid);
        if elect_sync(FULL) {
            atom_shared_cta_add_u32(smem + 4, 1);
        }
        bar_sync_0();
        if tid == 0 {
            put(out::ATOM_SHARED_SUM, ld_shared_cta_u32(smem));
            put(out::ELECT_COUNT, ld_shared_cta_u32(smem + 4));
        }
        // System-scope atomic add and gpu-scope reduction on scratch.
        atom_relaxed_sys_global_add_u32(scratch, 1);
        red_relaxed_gpu_global_add_s32(scratch.add(1) as *mut i32, tid as i32);
        // Block scan of ones: thread t gets t.
        let (excl, total) = block_exclusive_scan_u32(1, smem + 64);
        let scan_ok = warp_sum_u32((excl == tid) as u32);
        if lane == 0 {
            atom_relaxed_sys_global_add_u32(scratch.add(2), scan_ok);
        }
        bar_sync_0();
        fence_acq_rel_gpu();
        if tid == 0 {
            put(out::ATOM_SYS_ADD, ld_relaxed_sys_global_u32(scratch));
            put(out::RED_GPU_SUM, ld_relaxed_sys_global_u32(scratch.add(1)));
            put(out::SCAN_OK, ld_relaxed_sys_global_u32(scratch.add(2)));
            put(out::SCAN_TOTAL, total);
            let t0 = globaltimer();
            nanosleep_u32(2000);
            let t1 = globaltimer();
            put(out::TIMER_ADVANCES, (t1 > t0) as u32);
            // Release/acquire at gpu scope, volatile and relaxed system scope.
            st_release_gpu_global_u32(scratch.add(3), 77);
            put(out::ACQ_REL_GPU, ld_acquire_gpu_global_u32(scratch.add(3)));
            st_volatile_global_u32(scratch.add(4), 5);
            st_relaxed_sys_global_u32(scratch.add(5), ld_volatile_global_u32(scratch.add(4)) + 1);
            st_release_sys_global_u32(scratch.add(6), ld_acquire_sys_global_u32(scratch.add(5)) + 1);
            put(out::VOLATILE_RELAXED, ld_acquire_sys_global_u32(scratch.add(6)));
            // CAS: 0 -> 9 succeeds and returns 0, second CAS fails and returns 9.
            atom_relaxed_sys_global_cas_b32(scratch.add(7), 0, 9);
            put(out::CAS_OLD, atom_relaxed_sys_global_cas_b32(scratch.add(7), 0, 11));
            // Scalar arithmetic.
            put(out::DIV_RN, div_rn_f32(1.0, 3.0).to_bits());
            put(out::FMA_RN, fma_rn_f32(1.0 + f32::EPSILON, 1.0 - f32::EPSILON, -1.0).to_bits());
            put(out::ADD_RN, add_rn_f32(0.1, 0.2).to_bits());
            put(out::MUL_RN, mul_rn_f32(0.1, 0.3).to_bits());
            put(out::CVT_F32_BF16, cvt_f32_bf16(0x3FC0).to_bits());
            put(out::ABS, abs_f32(-2.5).to_bits());
            put(out::MAX, max_f32(-1.0, 3.5).to_bits());
        }
        // The remaining wrappers: 64-bit, 16-bit, signed and shared-vector accesses, fences.
        bar_warp_sync(FULL);
        if tid == 0 {
            let mut ok = 1u32;
            st_global_u64(scratch.add(8) as *mut u64, 0x0123_4567_89ab_cdef);
            fence_sc_sys();
            ok &= (ld_acquire_sys_global_u64(scratch.add(8) as *const u64) == 0x0123_4567_89ab_cdef) as u32;
            ok &= (ld_global_nc_u16(scratch.add(64) as *const u16) == (ld_relaxed_sys_global_u32(scratch.add(64)) & 0xffff) as u16) as u32;
            ok &= (ld_relaxed_sys_global_s32(scratch.add(64) as *const i32) as u32 == ld_relaxed_sys_global_u32(scratch.add(64))) as u32;
            st_global_v2_u32(scratch.add(12) as *mut [u32; 2], [5, 6]);
            ok &= (ld_global_u32(scratch.add(13)) == 6) as u32;
            ok &= (atom_relaxed_gpu_global_add_u32(scratch.add(12), 2) == 5) as u32;
            red_release_sys_global_add_u32(scratch.add(12), 3);
            red_relaxed_sys_global_add_u32(scratch.add(12), 4);
            ok &= (ld_relaxed_sys_global_u32(scratch.add(12)) == 14) as u32;
            st_shared_cta_v4_u32(smem + 256, [1, 2, 3, 4]);
            st_shared_cta_v2_u32(smem + 256, [9, 8]);
            let v = ld_shared_cta_v4_u32(smem + 256);
            ok &= (v == [9, 8, 3, 4]) as u32;
            put(out::MISC_OK, ok);
            put(out::DYN_SMEM, dynamic_smem_size());
            put(out::SMID_VALID, (smid() < 1024) as u32);
        }
        // Named barrier among the first warp only.
        if tid < 32 {
            bar_sync(1, 32);
            if tid == 0 {
                put(out::NAMED_BARRIER, 1);
            }
        }
        // 16-byte vector round trip: scratch[64..320] -> scratch[320..576].
        if tid < (BULK_WORDS / 4) as u32 {
            let v = ld_global_nc_v4_u32((scratch.add(64) as *const [u32; 4]).add(tid as usize));
            st_global_v4_u32((scratch.add(320) as *mut [u32; 4]).add(tid as usize), v);
            let v2 = ld_global_nc_L1_no_allocate_v4_u32((scratch.add(64) as *const [u32; 4]).add(tid as usize));
            st_global_L1_no_allocate_v4_u32((scratch.add(576) as *mut [u32; 4]).add(tid as usize), v2);
        }
        bar_sync_0();
        fence_acq_rel_gpu();
        if tid < 32 {
            let mut bad = 0;
            let mut i = lane as usize;
            while i < BULK_WORDS {
                let want = ld_global_v4_u32(scratch.add(64 + 4 * (i / 4)) as *const [u32; 4])[i % 4];
                if ld_relaxed_sys_global_u32(scratch.add(320 + i)) != want || ld_relaxed_sys_global_u32(scratch.add(576 + i)) != want {
                    bad += 1;
                }
                i += 32;
            }
            let bad = warp_sum_u32(bad);
            if tid == 0 {
                put(out::V4_ROUNDTRIP_BAD, bad);
            }
        }
        // Bulk copy round trip: scratch[64..320] -> shared -> scratch[832..1088].
        if tid == 0 {
            let buf = smem + 1024;
            let bar = smem + 512;
            mbarrier_init_shared_cta_b64(bar, 1);
            fence_proxy_async_shared_cta();
            mbarrier_arrive_expect_tx_shared_cta_b64(bar, (BULK_WORDS * 4) as u32);
            cp_async_bulk_shared_cluster_global_mbarrier_complete_tx_bytes(buf, scratch.add(64) as *const u8, (BULK_WORDS * 4) as u32, bar);
            while !mbarrier_try_wait_parity_shared_cta_b64(bar, 0) {}
            cp_async_bulk_global_shared_cta_bulk_group(scratch.add(832) as *mut u8, buf, (BULK_WORDS * 4) as u32);
            cp_async_bulk_commit_group();
            cp_async_bulk_wait_group_read::<0>();
            cp_async_bulk_wait_group::<0>();
            fence_proxy_async_global();
            let mut bad = 0;
            for i in 0..BULK_WORDS {
                if ld_relaxed_sys_global_u32(scratch.add(832 + i)) != ld_relaxed_sys_global_u32(scratch.add(64 + i)) {
                    bad += 1;
                }
            }
            put(out::BULK_ROUNDTRIP_BAD, bad);
        }
        // Conversions: each thread converts pairs of inputs.
        let mut i = 2 * tid as usize;
        while i + 1 < SELFTEST_CVT_INPUTS {
            let a = ld_global_nc_f32((p.cvt_in as *const f32).add(i));
            let b = ld_global_nc_f32((p.cvt_in as *const f32).add(i + 1));
            let f8 = cvt_rn_satfinite_e4m3x2_f32(b, a);
            st_global_u8((p.cvt_fp8 as *mut u8).add(i), f8 as u8);
            st_global_u8((p.cvt_fp8 as *mut u8).add(i + 1), (f8 >> 8) as u8);
            let bf = cvt_rn_bf16x2_f32(b, a);
            st_global_u32((p.cvt_bf16 as *mut u32).add(i / 2), bf);
            i += 2 * ntid_x() as usize;
        }
    }
}
