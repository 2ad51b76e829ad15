//! GPU tests of the foundation: the device layer, the symmetric heap in both process modes,
//! barriers, and deadlines. Where GPUs are missing, each is reported as ignored, with the reason.

use anyhow::{Result, ensure};
use moe_ep::abi::{SELFTEST_CVT_INPUTS, selftest_out as o};
use moe_ep::{Error, Group, diag};
use moe_ep_kernels::fp::{f32_to_bf16, f32_to_e4m3};
use moe_ep_tests::*;
use std::time::{Duration, Instant};

fn gpu1_device_layer_selftest() -> Result<()> {
    // Conversion inputs: special values, every e4m3 rounding boundary region, random spread.
    let mut rng = moe_ep::reference::Rng::new(fresh_seed("selftest"));
    let mut inp: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        448.0,
        449.0,
        464.0,
        465.0,
        -500.0,
        1e-9,
        0.0009765625,
        0.001953125,
        0.0029296875,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.0e38,
    ];
    while inp.len() < SELFTEST_CVT_INPUTS {
        let e = rng.below(40) as i32 - 20;
        inp.push(rng.normal() * 2f32.powi(e));
    }
    let r = Group::run_threads(1, test_config(), |g| diag::ptx_selftest(g, &inp)).pop().unwrap()?;
    let w = &r.words;
    let threads = r.threads;
    let checks: Vec<(&str, u32, u32)> = vec![
        ("ntid", w[o::NTID], threads),
        ("nctaid", w[o::NCTAID], 1),
        ("vote.sync.ballot", w[o::BALLOT_EVEN], 0x5555_5555),
        ("shfl.sync.idx", w[o::SHFL_IDX], 15),
        ("shfl.sync.bfly sum", w[o::WARP_SUM], 496),
        ("shfl.sync.up", w[o::SHFL_UP], 8),
        ("vote.sync.any", w[o::VOTE_ANY], 1),
        ("elect.sync count", w[o::ELECT_COUNT], threads / 32),
        ("atom.shared add", w[o::ATOM_SHARED_SUM], threads * (threads - 1) / 2),
        ("atom.relaxed.sys add", w[o::ATOM_SYS_ADD], threads),
        ("red.relaxed.gpu add", w[o::RED_GPU_SUM], threads * (threads - 1) / 2),
        ("block scan", w[o::SCAN_OK], threads),
        ("block scan total", w[o::SCAN_TOTAL], threads),
        ("globaltimer advances", w[o::TIMER_ADVANCES], 1),
        ("st.release/ld.acquire gpu", w[o::ACQ_REL_GPU], 77),
        ("volatile/relaxed/release/acquire chain", w[o::VOLATILE_RELAXED], 7),
        ("atom.cas old", w[o::CAS_OLD], 9),
        ("named barrier", w[o::NAMED_BARRIER], 1),
        ("v4 load/store round trip mismatches", w[o::V4_ROUNDTRIP_BAD], 0),
        ("cp.async.bulk round trip mismatches", w[o::BULK_ROUNDTRIP_BAD], 0),
        ("group max over 8 lanes", w[o::GROUP_MAX], 7.0f32.to_bits()),
        ("div.rn", w[o::DIV_RN], (1.0f32 / 3.0).to_bits()),
        ("fma.rn", w[o::FMA_RN], (1.0f32 + f32::EPSILON).mul_add(1.0 - f32::EPSILON, -1.0).to_bits()),
        ("add.rn", w[o::ADD_RN], (0.1f32 + 0.2).to_bits()),
        ("mul.rn", w[o::MUL_RN], (0.1f32 * 0.3).to_bits()),
        ("cvt.f32.bf16", w[o::CVT_F32_BF16], 1.5f32.to_bits()),
        ("abs", w[o::ABS], 2.5f32.to_bits()),
        ("max", w[o::MAX], 3.5f32.to_bits()),
        ("64/16-bit, signed, shared-vector accesses", w[o::MISC_OK], 1),
        ("%dynamic_smem_size", w[o::DYN_SMEM], 8192),
        ("%smid", w[o::SMID_VALID], 1),
    ];
    let bad: Vec<String> =
        checks.iter().filter(|(_, got, want)| got != want).map(|(n, got, want)| format!("{n}: got {got:#x} want {want:#x}")).collect();
    ensure!(bad.is_empty(), "device layer mismatches:\n{}", bad.join("\n"));
    // Hardware conversions against the CPU reference conversions, bit for bit.
    let want_fp8: Vec<u8> = inp.iter().map(|&x| f32_to_e4m3(x)).collect();
    compare("cvt.rn.satfinite.e4m3x2.f32 vs CPU e4m3", &r.fp8, &want_fp8)?;
    let want_bf16: Vec<u16> = inp.iter().map(|&x| f32_to_bf16(x)).collect();
    compare("cvt.rn.bf16x2.f32 vs CPU bf16", &r.bf16, &want_bf16)?;
    Ok(())
}

fn gpu2_heap_pattern() -> Result<()> {
    run_both_modes("gpu2_heap_pattern", |g, seed| {
        // 1 MiB + 4 bytes per slot: odd sizes catch off-by-one strides.
        let bad = diag::heap_pattern_roundtrip(g, (1 << 20) + 4, seed as u32, 3)?;
        ensure!(bad.iter().all(|&b| b == 0), "rank {}: mismatching words per source rank: {bad:?}", g.rank());
        // Where ranks share a GPU, what each got of it (the MPS share, checked to fit).
        if g.gpu_sharers() > 1 {
            println!(
                "rank {}: {} ranks share this {}: {} SMs, {} (the device reports {} SMs to this rank's context)",
                g.rank(),
                g.gpu_sharers(),
                g.device_name(),
                g.sm_count(),
                g.sm_count_source(),
                g.device_sm_count()
            );
        }
        Ok(())
    })
}

fn gpu2_barrier_10k() -> Result<()> {
    run_both_modes("gpu2_barrier_10k", |g, _| {
        // 10,000 barriers in one launch, then 1,000 launches of one barrier.
        diag::barrier_loop(g, 1, 10_000)?;
        diag::barrier_loop(g, 1_000, 1)?;
        Ok(())
    })
}

fn gpu2_silent_peer_times_out() -> Result<()> {
    run_both_modes("gpu2_silent_peer_times_out", |g, _| {
        let peer = (g.rank() + 1) % g.world();
        let deadline = Duration::from_millis(300);
        let t0 = Instant::now();
        let r = diag::wait_for_silent_peer(g, peer, deadline);
        let took = t0.elapsed();
        match r {
            Err(Error::Timeout { rank, peer: p, waited, .. }) => {
                ensure!(rank == g.rank() && p == peer, "timeout names rank {rank} / peer {p}, expected {} / {peer}", g.rank());
                ensure!(waited >= deadline, "reported wait {waited:?} is shorter than the deadline");
            }
            // Every rank waits with the same deadline; a rank whose deadline passed a little
            // earlier tells the others (fast failure), which may stop on that news first.
            Err(Error::PeerFailed { rank, peer: p, cause, .. }) => {
                ensure!(rank == g.rank() && p != rank, "PeerFailed names rank {rank} / peer {p}");
                ensure!(cause.contains("timed out") || cause.contains("timeout"), "PeerFailed cause {cause:?}");
                ensure!(took >= deadline / 2, "a peer's timeout surfaced after {took:?}, before any deadline could pass");
            }
            other => anyhow::bail!("expected a timeout naming peer {peer}, got {other:?}"),
        }
        ensure!(took < Duration::from_secs(10), "the timeout took {took:?} to surface");
        // The group is failed from now on: nothing more runs on it (its GPU state is
        // undefined), every call says why, and it still drops cleanly.
        let timed_out = |c: &str| c.contains("timed out") || c.contains("timeout");
        ensure!(g.failure().is_some_and(|c| timed_out(&c)), "failure cause: {:?}", g.failure());
        match g.barrier() {
            Err(Error::GroupFailed { cause }) => ensure!(timed_out(&cause), "cause {cause:?}"),
            other => anyhow::bail!("a barrier on the failed group: expected GroupFailed, got {other:?}"),
        }
        Ok(())
    })
}

/// Ranks on two nodes (`MOE_EP_NODE` set per process: ranks `0..W/2` and the rest): the group
/// is made (each rank maps only its own node's memory), says which rank is where,
/// `Group::barrier` meets every rank (on the host), and what needs another node's memory mapped
/// is refused with a typed error naming the ranks on other nodes, on every rank alike, leaving
/// the group usable: the GPU barrier, high-throughput buffers and low-latency buffers in
/// moe-ep's own heap (the error points to NVSHMEM's memory).
fn gpu2_group_across_nodes() -> Result<()> {
    let name = "gpu2_group_across_nodes";
    let worlds = rank_counts(name)?;
    if !in_child() {
        report_line("ranks", name, &format!("{worlds:?}"));
    }
    for world in worlds {
        let half = world.div_ceil(2);
        let seed = fresh_seed(name);
        if !in_child() {
            println!("{name}: {world} ranks, processes standing for 2 nodes ({half} ranks on the first), seed {seed}");
        }
        run_processes_with_env(name, world, seed, &[("MOE_EP_TEST_NODE_SIZE", &half.to_string())], |g| {
            let (rank, world) = (g.rank(), g.world());
            let want: Vec<u32> = (0..world).map(|r| (r / half) as u32).collect();
            ensure!(g.nodes() == want.as_slice() && g.spans_nodes(), "rank {rank}: nodes {:?}, expected {want:?}", g.nodes());
            let far: Vec<usize> = (0..world).filter(|r| r / half != rank / half).collect();
            let names_far = |what: &str, r: std::result::Result<(), Error>, also: &str| -> Result<()> {
                match r {
                    Err(e @ Error::InvalidArgument { .. }) if e.to_string().contains(&format!("{far:?}")) && e.to_string().contains(also) => Ok(()),
                    other => anyhow::bail!("rank {rank}: {what}: expected InvalidArgument naming ranks {far:?}, got {other:?}"),
                }
            };
            for _ in 0..3 {
                g.barrier()?;
            }
            names_far("the GPU barrier", g.launch_barrier(g.stream(), 1), "Group::barrier")?;
            let ll = moe_ep::ll::LlBuffer::new(g, moe_ep::ll::LlConfig::new(experts_for(world, 8), 128, 2, 8)).map(drop);
            names_far("a low-latency buffer in moe-ep's heap", ll, "with_nvshmem")?;
            let cfg = moe_ep::ht::HtConfig::new(experts_for(world, 8), 128, 2, 8, world).fit_sms(g.sm_count());
            names_far("a high-throughput buffer", moe_ep::ht::HtBuffer::new(g, cfg).map(drop), "NVSHMEM")?;
            g.barrier()?;
            ensure!(g.failure().is_none(), "rank {rank}: the refusals failed the group: {:?}", g.failure());
            println!("rank {rank} of {world}: nodes {:?}; host barriers met; GPU barrier and IPC buffers refused naming ranks {far:?}", g.nodes());
            Ok(())
        })?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    gpu_main(&[
        ("gpu1_device_layer_selftest", gpu1_device_layer_selftest),
        ("gpu2_heap_pattern", gpu2_heap_pattern),
        ("gpu2_barrier_10k", gpu2_barrier_10k),
        ("gpu2_silent_peer_times_out", gpu2_silent_peer_times_out),
        ("gpu2_group_across_nodes", gpu2_group_across_nodes),
    ])
}
