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
use moe_ep::{Group, GroupConfig};
use report::Report;
use std::process::Command;
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
    /// Testing: every rank a thread on GPU 0 (a smoke test of the benchmark's code on a
    /// one-GPU machine; its numbers mean nothing).
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
                     --shared-gpu: testing: every rank a thread on GPU 0, a smoke test of this program on one GPU (no figure means anything)\n\
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
    let cfg = GroupConfig { timeout: Duration::from_secs(30), rendezvous_timeout: Duration::from_secs(120) };
    if o.shared_gpu {
        let ranks = o.ranks.unwrap_or(2);
        let results = Group::run_threads_sharing_gpu(ranks, 0, cfg, |g| Ok(run_parts(g, &o)));
        for (r, res) in results.into_iter().enumerate() {
            res.map_err(anyhow::Error::from).and_then(|x| x).with_context(|| format!("rank {r} (sharing GPU 0)"))?;
        }
        return Ok(());
    }
    if std::env::var("RANK").is_err() && std::env::var("MOE_EP_RANK").is_err() {
        return launch(&o);
    }
    let g = Group::from_env(cfg).context("joining the benchmark group")?;
    run_parts(&g, &o)
}

/// This rank's share of every part asked for; rank 0 writes the report after each part.
fn run_parts(g: &Group, o: &Opts) -> Result<()> {
    let mut rep = Report::new(g);
    if o.shared_gpu {
        rep.header += " -- SHARED GPU: every rank is a thread on GPU 0 (a smoke test of the benchmark; no figure below means anything)";
    }
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

/// Parent: one process per rank, this binary again with torchrun's variables.
fn launch(o: &Opts) -> Result<()> {
    let n = moe_ep::device_count().map_err(|e| anyhow::anyhow!("{e}"))?;
    let ranks = o.ranks.unwrap_or(n);
    if n < 2 || ranks < 2 {
        bail!("the benchmark needs at least 2 GPUs connected by NVLink; this machine has {n} (asked for {ranks} ranks)");
    }
    if ranks > n {
        bail!("--ranks {ranks} but this machine has {n} GPUs");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    // The ranks' shared secret, fresh for this run.
    let secret = moe_ep::rendezvous::random_secret()?;
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut children = Vec::new();
    for r in 0..ranks {
        children.push(
            Command::new(&exe)
                .args(&args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", ranks.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MOE_EP_MASTER_PORT", port.to_string())
                .env("MOE_EP_SECRET", &secret)
                .spawn()
                .with_context(|| format!("starting rank {r}"))?,
        );
    }
    let mut failed = Vec::new();
    for (r, mut c) in children.into_iter().enumerate() {
        let st = c.wait()?;
        if !st.success() {
            failed.push(format!("rank {r}: {st}"));
        }
    }
    if !failed.is_empty() {
        bail!("benchmark ranks failed: {}", failed.join(", "));
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
