//! `moe-ep-soak`: a long run of mixed high-throughput and low-latency operations on this
//! machine's GPUs (one thread per GPU), each with a random shape, routing, per-rank token
//! count, payload and mode, every output poisoned first and compared whole with the CPU
//! reference (the GPU tests' cases, on long-lived buffers). Meant for the GPU machine, not CI:
//! `cargo xtask soak` here, `run.sh soak` in the GPU bundle.
//!
//! usage: moe-ep-soak [--iters N] [--seconds S] [--ranks N] [--seed S] [--shared-gpu]
//!
//! `--shared-gpu` runs the ranks as processes sharing GPU 0 under CUDA MPS (2 ranks unless
//! `--ranks`; the MPS control daemon must be running): the soak on a one-GPU machine.
//!
//! `--seconds` stops every rank after the first iteration that ends past `S` seconds (all
//! ranks agree on it), and the report says how many iterations ran.
//!
//! Every rank draws the same case from the seed and the iteration. The first mismatch or error
//! stops the run (the rank that found it aborts the group, so the others stop at once) and is
//! reported; the exit status is non-zero then. The last line counts iterations and mismatches.

use anyhow::{Context, Result, bail};
use moe_ep::ht::{HtBuffer, HtConfig};
use moe_ep::launch::Placement;
use moe_ep::ll::{CombineMode, LlBuffer, LlConfig, Payload, ScaleFormat, ScaleLayout};
use moe_ep::reference::{Rng, Routing};
use moe_ep::{Group, device_count};
use moe_ep_tests::{experts_for, ht_case, ll_case, test_config};
use std::time::Instant;

/// Buffers every rank builds once: (experts before rounding to the world, hidden, max top-k,
/// max tokens per rank).
/// (Small enough that the CPU reference keeps up: about 10,000 iterations in a few minutes at
/// 4 ranks; the GPU tests cover the large shapes.)
const LL_BUFFERS: [(usize, usize, usize, usize); 2] = [(64, 1024, 8, 64), (32, 2048, 4, 32)];
const HT_BUFFERS: [(usize, usize, usize, usize); 2] = [(64, 1024, 8, 128), (16, 512, 2, 64)];

/// What one iteration ran.
#[derive(Debug)]
enum Op {
    Ll(usize, ll_case::Case),
    Ht(usize, ht_case::Case),
}

fn routing(rng: &mut Rng, experts: usize, world: usize) -> Routing {
    match rng.below(6) {
        0 => Routing::OneRank(rng.below(world)),
        1 => Routing::SameExperts(rng.below(experts)),
        _ => Routing::Scores,
    }
}

fn drop_rate(rng: &mut Rng) -> f32 {
    [0.0, 0.0, 0.1, 0.3, 1.0][rng.below(5)]
}

/// Iteration `i`'s operation (the same on every rank).
fn draw(seed: u64, i: u64, world: usize) -> Op {
    let mut rng = Rng::new(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if rng.below(2) == 0 {
        let b = rng.below(LL_BUFFERS.len());
        let (e, hidden, max_k, max_tokens) = LL_BUFFERS[b];
        let experts = experts_for(world, e);
        let payload = match rng.below(4) {
            0 => Payload::Bf16,
            1 => Payload::Fp8(ScaleFormat::F32),
            2 => Payload::Fp8(ScaleFormat::F32Pow2),
            _ => Payload::Fp8(ScaleFormat::Ue8m0),
        };
        let case = ll_case::Case {
            k: 1 + rng.below(max_k),
            max_tokens,
            tokens: rng.below(max_tokens + 1),
            routing: routing(&mut rng, experts, world),
            drop: drop_rate(&mut rng),
            zero_rank: rng.below(8) == 0,
            payload,
            hook: rng.below(2) == 0,
            zero_copy: rng.below(3) == 0,
            mode: if rng.below(2) == 0 { CombineMode::PerExpert } else { CombineMode::PreReduced },
            layout: if payload != Payload::Bf16 && rng.below(2) == 0 { ScaleLayout::ColumnMajor } else { ScaleLayout::RowMajor },
            ..ll_case::Case::base(hidden, max_k, e, max_tokens)
        };
        Op::Ll(b, case)
    } else {
        let b = rng.below(HT_BUFFERS.len());
        let (e, hidden, max_k, max_tokens) = HT_BUFFERS[b];
        let experts = experts_for(world, e);
        let case = ht_case::Case {
            k: 1 + rng.below(max_k),
            tokens: rng.below(max_tokens + 1),
            routing: routing(&mut rng, experts, world),
            drop: drop_rate(&mut rng),
            empty_rank: (rng.below(8) == 0).then(|| rng.below(world)),
            fp8: rng.below(2) == 0,
            alignment: [1, 1, 32, 128][rng.below(4)],
            i32_idx: rng.below(2) == 0,
            ..ht_case::Case::base(hidden, max_k, e, max_tokens)
        };
        Op::Ht(b, case)
    }
}

/// One rank's loop; `Ok(iterations run)` or the first failure (after aborting the group).
fn soak(g: &Group, iters: u64, seconds: f64, seed: u64) -> Result<u64> {
    let world = g.world();
    let mut ll: Vec<LlBuffer> =
        LL_BUFFERS.iter().map(|&(e, h, k, t)| LlBuffer::new(g, LlConfig::new(experts_for(world, e), h, k, t))).collect::<moe_ep::Result<_>>()?;
    let mut ht: Vec<HtBuffer> = HT_BUFFERS
        .iter()
        .map(|&(e, h, k, t)| HtBuffer::new(g, HtConfig::new(experts_for(world, e), h, k, t, world).fit_sms(g.sm_count())))
        .collect::<moe_ep::Result<_>>()?;
    let t0 = Instant::now();
    for i in 0..iters {
        let op = draw(seed, i, world);
        let case_seed = seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x50a4;
        let r = match &op {
            Op::Ll(b, c) => ll_case::run_case_on(g, &mut ll[*b], case_seed, *c),
            Op::Ht(b, c) => ht_case::run_case_on(g, &mut ht[*b], case_seed, *c),
        };
        if let Err(e) = r {
            if g.failure().is_none() {
                g.abort(&format!("rank {} stopped the soak at iteration {i}", g.rank()));
            }
            return Err(e.context(format!("rank {} iteration {i}: {op:?}", g.rank())));
        }
        if (i + 1) % 100 == 0 {
            if g.rank() == 0 && (i + 1) % 1000 == 0 {
                println!("{} iterations, {:.0} s", i + 1, t0.elapsed().as_secs_f64());
            }
            // Every rank stops at the same iteration: rank 0's clock decides.
            let late = g.rank() == 0 && t0.elapsed().as_secs_f64() > seconds;
            if g.all_gather_bytes(&[late as u8])?[0] == [1] {
                return Ok(i + 1);
            }
        }
    }
    Ok(iters)
}

fn main() -> Result<()> {
    let mut iters = 1000u64;
    let mut seconds = f64::INFINITY;
    let mut ranks = 0usize;
    let mut shared_gpu = false;
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    const USAGE: &str = "usage: moe-ep-soak [--iters N] [--seconds S] [--ranks N] [--seed S] [--shared-gpu]";
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--iters" => iters = value("--iters")?.parse()?,
            "--seconds" => seconds = value("--seconds")?.parse()?,
            "--ranks" => ranks = value("--ranks")?.parse()?,
            "--seed" => seed = value("--seed")?.parse()?,
            "--shared-gpu" => shared_gpu = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} ({USAGE})"),
        }
    }
    let t0 = Instant::now();
    // A rank process of a --shared-gpu soak (started below, with the parent's seed).
    if std::env::var("RANK").is_ok() {
        let g = Group::from_env(test_config()).context("joining the soak's group")?;
        let world = g.world();
        if g.rank() == 0 {
            println!(
                "soak: {world} ranks as processes sharing one {} under CUDA MPS ({} SMs each), {iters} iterations, seed {seed}",
                g.device_name(),
                g.sm_count()
            );
        }
        let r = soak(&g, iters, seconds, seed);
        let ran = g
            .all_gather_bytes(&r.as_ref().map_or(0, |n| *n).to_le_bytes())
            .map(|all| all.iter().map(|b| b.as_slice().try_into().map(u64::from_le_bytes).unwrap_or(0)).min().unwrap_or(0));
        return match r {
            Ok(_) => {
                if g.rank() == 0 {
                    summary(ran.unwrap_or(0), iters, world, t0.elapsed().as_secs_f64(), seed);
                }
                Ok(())
            }
            Err(e) => {
                eprintln!("rank {}: {e:#}", g.rank());
                println!("soak: stopped at the first failure (above), {:.0} s, seed {seed}: 1 mismatch or error", t0.elapsed().as_secs_f64());
                std::process::exit(1);
            }
        };
    }
    let gpus = device_count().context("counting GPUs")?;
    if shared_gpu {
        let world = if ranks == 0 { 2 } else { ranks };
        if !(2..=moe_ep::abi::MAX_RANKS).contains(&world) {
            bail!("--ranks {world}: a shared-GPU soak runs 2 to {} ranks", moe_ep::abi::MAX_RANKS);
        }
        if moe_ep::mps_control_pipe().is_none() {
            bail!("--shared-gpu needs the CUDA MPS control daemon (nvidia-cuda-mps-control -d)");
        }
        let mut args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--shared-gpu").collect();
        args.extend(["--seed".to_string(), seed.to_string()]);
        let exe = std::env::current_exe()?;
        if !moe_ep::launch::run_ranks(&exe, &args, world, &Placement::SharedGpu("0".into()))?.is_empty() {
            std::process::exit(1);
        }
        return Ok(());
    }
    let world = if ranks == 0 { gpus } else { ranks };
    if world < 2 || world > gpus {
        bail!("--ranks {world}: this machine has {gpus} GPU(s); the soak needs 2 to {gpus} ranks (--shared-gpu: processes sharing one GPU)");
    }
    let results = Group::run_threads(world, test_config(), |g| {
        if g.rank() == 0 {
            println!("soak: {world} x {}, one thread per GPU, {iters} iterations, seed {seed}", g.device_name());
        }
        Ok(soak(g, iters, seconds, seed))
    });
    let mut failures = Vec::new();
    let mut ran = iters;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(Ok(n)) => ran = ran.min(n),
            Ok(Err(e)) => failures.push(format!("rank {r}: {e:#}")),
            Err(e) => failures.push(format!("rank {r}: {e}")),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if failures.is_empty() {
        summary(ran, iters, world, secs, seed);
        Ok(())
    } else {
        for f in &failures {
            eprintln!("{f}");
        }
        println!("soak: stopped at the first failure (above), {secs:.0} s, seed {seed}: 1 mismatch or error");
        std::process::exit(1);
    }
}

/// The last line of a soak that found nothing.
fn summary(ran: u64, iters: u64, world: usize, secs: f64, seed: u64) {
    let stopped = if ran < iters { format!(" (stopped by --seconds before {iters})") } else { String::new() };
    println!("soak: {ran} iterations at {world} ranks{stopped}, 0 mismatches, {secs:.0} s, seed {seed}");
}
