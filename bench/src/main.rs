//! `moe-ep-bench`: the main job. Measures, on the local GPUs and in one run:
//!
//! - `p2p`: the physical limits (SM-issued P2P store bandwidth per pair, register and bulk-copy
//!   engines; all ranks storing at once; flag round-trip latency);
//! - `ht`: high-throughput dispatch (full and cached, BF16 and FP8) and combine with DeepEP's
//!   defaults, beside an NCCL all-to-all of the same traffic and the P2P limit, plus a sweep
//!   over tokens per rank and SM budget;
//! - `ll`: low-latency dispatch and both combine modes (and their send/receive halves), grid
//!   sizes and a sweep over tokens per rank, beside the flag round trip;
//! - `tune`: the high-throughput combine's push/reduce block split for each SM budget.
//!
//! Without `RANK` in the environment it launches one process per local GPU (or `--ranks N`)
//! and waits for them; rank 0 prints the tables and, with `--out DIR`, writes them there.

mod ht;
mod ll;
mod p2p;
mod report;

use anyhow::{Context, Result, bail};
use moe_ep::launch::Placement;
use moe_ep::{Group, GroupConfig};
use report::Report;
use std::time::Duration;

/// Command-line options.
#[derive(Clone, Debug)]
pub struct Opts {
    pub what: Vec<String>,
    pub ranks: Option<usize>,
    pub out: Option<std::path::PathBuf>,
    pub tokens: usize,
    pub sms: u32,
    /// Combine blocks that push (0 = the library's default, half).
    pub push: u32,
    pub iters: usize,
    pub sweep: bool,
    pub quick: bool,
    /// Microseconds the low-latency timings' start barrier holds on the GPU, so the timed call
    /// is queued before the window opens (0: the window opens while the host still launches).
    pub hold_us: u64,
    /// High-throughput combine with the bulk push (`PushEngine::Bulk`) instead of the tuned one.
    pub bulk_push: bool,
    /// Every rank a process on GPU 0, sharing it under CUDA MPS (a smoke test of the
    /// benchmark's code on a one-GPU machine; no figure but the labelled flag round trip means
    /// anything).
    pub shared_gpu: bool,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        what: vec![],
        ranks: None,
        out: None,
        tokens: 4096,
        sms: 24,
        push: 0,
        iters: 60,
        sweep: true,
        quick: false,
        hold_us: 50,
        bulk_push: false,
        shared_gpu: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "p2p" | "ht" | "ll" | "tune" | "all" => o.what.push(a.clone()),
            "--ranks" => o.ranks = Some(val("--ranks")?.parse()?),
            "--out" => o.out = Some(val("--out")?.into()),
            "--tokens" => o.tokens = val("--tokens")?.parse()?,
            "--sms" => o.sms = val("--sms")?.parse()?,
            "--push" => o.push = val("--push")?.parse()?,
            "--iters" => o.iters = val("--iters")?.parse()?,
            "--hold-us" => o.hold_us = val("--hold-us")?.parse()?,
            "--no-sweep" => o.sweep = false,
            "--bulk-push" => o.bulk_push = true,
            "--shared-gpu" => o.shared_gpu = true,
            "--quick" => {
                o.quick = true;
                o.sweep = false;
                o.iters = 20;
            }
            "-h" | "--help" => {
                println!(
                    "usage: moe-ep-bench [p2p|ht|ll|tune|all]... [--ranks N] [--out DIR] [--tokens N] [--sms N] [--push N] [--iters N] [--hold-us N] [--bulk-push] [--shared-gpu] [--no-sweep] [--quick]\n\
                     all (the default) = p2p ht ll; tune = the combine push/reduce split for each SM budget and push engine\n\
                     --bulk-push: high-throughput combine pushes rows with bulk copies (cp.async.bulk)\n\
                     --shared-gpu: every rank a process on GPU 0 under CUDA MPS (MPS must be running), a smoke test of this program on one GPU:\n\
                     \x20 every table is labelled, and no figure but the flag round trip (labelled as such) says anything about speed\n\
                     --hold-us: how long the low-latency timings' start barrier holds (default 50; 0 = the window opens while the call is launched)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if o.what.is_empty() || o.what.iter().any(|w| w == "all") {
        o.what = vec!["p2p".into(), "ht".into(), "ll".into()];
    }
    if o.iters < 50 && !o.quick {
        bail!("--iters {}: the benchmark reports medians of at least 50 timed runs", o.iters);
    }
    Ok(o)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("moe-ep-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let o = parse()?;
    let cfg = GroupConfig { timeout: Duration::from_secs(30), rendezvous_timeout: Duration::from_secs(120), ..GroupConfig::default() };
    if std::env::var("RANK").is_err() && std::env::var("MOE_EP_RANK").is_err() {
        return launch(&o);
    }
    let g = Group::from_env(cfg).context("joining the benchmark group")?;
    run_parts(&g, &o)
}

/// This rank's share of every part asked for; rank 0 writes the report after each part.
fn run_parts(g: &Group, o: &Opts) -> Result<()> {
    let mut rep = Report::new(g);
    // Ranks sharing a GPU (--shared-gpu, or MOE_EP_SHARE_GPU under a launcher): every table
    // is a smoke run of this program. Their SM budget is their share.
    let shared;
    let o = if g.gpu_sharers() > 1 {
        rep.header += &format!(
            " -- SHARED GPU: {} ranks are processes on one GPU under CUDA MPS, {} SMs each; a correctness smoke run of the benchmark, \
             no figure below says anything about NVLink or speed (the flag round trip, labelled, is the one close to NVLink's)",
            g.gpu_sharers(),
            g.sm_count()
        );
        shared = Opts { sms: o.sms.min(g.sm_count()), ..o.clone() };
        &shared
    } else {
        o
    };
    // The report is written after every part, so a part that fails keeps what came before.
    type Part = fn(&Group, &Opts, &mut Report) -> Result<()>;
    let parts: [(&str, Part); 4] = [("p2p", p2p::run), ("ht", ht::run), ("ll", ll::run), ("tune", ht::tune)];
    for (name, part) in parts {
        if o.what.iter().any(|w| w == name) {
            part(g, o, &mut rep)?;
            if g.rank() == 0 {
                rep.finish(o.out.as_deref(), report::PREFACE)?;
            }
        }
    }
    g.host_barrier()?;
    Ok(())
}

/// Parent: one process per rank, this binary again with torchrun's variables (all on GPU 0
/// under CUDA MPS with `--shared-gpu`).
fn launch(o: &Opts) -> Result<()> {
    let n = moe_ep::device_count().map_err(|e| anyhow::anyhow!("{e}"))?;
    let placement = if o.shared_gpu {
        if moe_ep::mps_control_pipe().is_none() {
            bail!("--shared-gpu needs the CUDA MPS control daemon (nvidia-cuda-mps-control -d; CUDA_MPS_PIPE_DIRECTORY where it is not the default)");
        }
        Placement::SharedGpu("0".into())
    } else {
        Placement::GpuPerRank
    };
    let ranks = o.ranks.unwrap_or(if o.shared_gpu { 2 } else { n });
    if !o.shared_gpu && (n < 2 || ranks < 2) {
        bail!(
            "the benchmark needs at least 2 GPUs connected by NVLink; this machine has {n} (asked for {ranks} ranks; --shared-gpu runs a smoke test on one)"
        );
    }
    if ranks < 2 || (!o.shared_gpu && ranks > n) || ranks > moe_ep::abi::MAX_RANKS {
        bail!("--ranks {ranks} cannot run on this machine's {n} GPU(s)");
    }
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let failed = moe_ep::launch::run_ranks(&exe, &args, ranks, &placement)?;
    if !failed.is_empty() {
        bail!("benchmark ranks failed: {}", failed.iter().map(|(r, st)| format!("rank {r}: {st}")).collect::<Vec<_>>().join(", "));
    }
    Ok(())
}

/// Median of a sample.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}
