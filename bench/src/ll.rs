//! Low-latency benchmark: 128 tokens per rank, hidden 7168, top-8 of 256, FP8 dispatch, BF16
//! combine in both modes; the send/receive halves; the grid size; a sweep over tokens per
//! rank; the flag round trip beside them. Every timed path is checked against the CPU
//! reference first (FP8 dispatch, both combine modes with non-zero expert outputs).

use crate::report::{Report, Series, line_chart, table};
use crate::{Opts, median};
use anyhow::{Context, Result, ensure};
use cudarc::driver::{CudaSlice, CudaStream, sys};
use half::bf16;
use moe_ep::abi::{scale_fmt, trace};
use moe_ep::diag;
use moe_ep::ll::{CombineArgs, CombineInput, CombineMode, DispatchArgs, LlBuffer, LlConfig};
use moe_ep::reference::{LlWorld, Rng, Routing, gen_bf16, gen_routing};
use moe_ep::{DeviceArg, Group, TopkIdx};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const EXPERTS: usize = 256;
const HIDDEN: usize = 7168;
const TOPK: usize = 8;
const TOKENS: usize = 128;
const SEED: u64 = 0x11;

/// Timed operations at the main point.
const OPS: [&str; 7] = [
    "dispatch",
    "combine (per expert)",
    "combine (pre-reduced)",
    "dispatch send",
    "dispatch recv",
    "combine send (pre-reduced)",
    "combine recv (pre-reduced)",
];

/// Every rank's inputs for `n` tokens (each rank regenerates all of them from the seed).
fn world_inputs(world: usize, experts: usize, n: usize) -> LlWorld {
    let mut w = LlWorld { num_experts: experts, hidden: HIDDEN, k: TOPK, x: vec![], topk_idx: vec![], topk_weights: vec![] };
    for r in 0..world {
        let mut rng = Rng::new(SEED ^ (r as u64) << 8 ^ (n as u64) << 32);
        let (idx, wt) = gen_routing(&mut rng, n, TOPK, experts, world, Routing::Scores, 0.0);
        w.x.push(gen_bf16(&mut rng, n * HIDDEN, 1.0));
        w.topk_idx.push(idx);
        w.topk_weights.push(wt);
    }
    w
}

/// The expert output for (global expert, source rank, token, slot): non-zero, deterministic,
/// so every rank can compute what any expert returns.
fn expert_output(e: usize, src: usize, t: usize, slot: usize) -> Vec<u16> {
    gen_bf16(&mut Rng::new(0xe0 ^ (e as u64) << 40 ^ (src as u64) << 32 ^ (t as u64) << 8 ^ slot as u64), HIDDEN, 1.0)
}

/// One rank's device inputs.
struct Inputs {
    x: CudaSlice<bf16>,
    idx: CudaSlice<i64>,
    w: CudaSlice<f32>,
}

fn upload(s: &Arc<CudaStream>, w: &LlWorld, me: usize) -> Result<Inputs> {
    let one = |v: &[u16]| -> Vec<bf16> { v.iter().map(|&b| bf16::from_bits(b)).collect() };
    let nonempty = |n: usize| n.max(1);
    let mut x = s.alloc_zeros::<bf16>(nonempty(w.x[me].len()))?;
    let mut idx = s.alloc_zeros::<i64>(nonempty(w.topk_idx[me].len()))?;
    let mut wt = s.alloc_zeros::<f32>(nonempty(w.topk_weights[me].len()))?;
    if !w.x[me].is_empty() {
        s.memcpy_htod(&one(&w.x[me]), &mut x)?;
        s.memcpy_htod(&w.topk_idx[me], &mut idx)?;
        s.memcpy_htod(&w.topk_weights[me], &mut wt)?;
    }
    Ok(Inputs { x, idx, w: wt })
}

/// FP8 dispatch (weights carried) of `inp`.
fn fp8_args(inp: &Inputs, hook: bool) -> DispatchArgs<'_> {
    DispatchArgs { topk_weights: Some(&inp.w), hook, ..DispatchArgs::fp8(&inp.x, TopkIdx::I64(&inp.idx)) }
}

fn combine_args<'a>(inp: &'a Inputs, y: &'a CudaSlice<bf16>, out: &'a dyn DeviceArg<bf16>, mode: CombineMode, hook: bool) -> CombineArgs<'a> {
    CombineArgs {
        x: CombineInput::Tensor(y),
        topk_idx: TopkIdx::I64(&inp.idx),
        topk_weights: (mode == CombineMode::PerExpert).then_some(&inp.w as _),
        out,
        mode,
        hook,
    }
}

/// Correctness first: the FP8 dispatch against the reference (every received row, its
/// scales, counts and sources), then both combine modes with non-zero expert outputs, bit for
/// bit. Returns the expert-output tensor it built (reused by the timing loop).
fn check(g: &Group, buf: &mut LlBuffer, w: &LlWorld, inp: &Inputs) -> Result<CudaSlice<bf16>> {
    let (world, me, s) = (g.world(), g.rank(), g.stream());
    let epr = w.num_experts / world;
    let rows_pe = world * TOKENS;
    let (h, _) = buf.dispatch(s, &fp8_args(inp, false))?;
    buf.check()?;
    let counts = buf.recv_count(&h)?.to_vec(s)?;
    let meta = buf.recv_src_info(&h)?.to_vec(s)?;
    let x = buf.recv_x_fp8(&h)?.to_vec(s)?;
    let sc = buf.recv_scales(&h)?.to_vec(s)?;
    let want = w.dispatch(me, Some(scale_fmt::F32));
    let groups = HIDDEN / 128;
    let mut y = vec![0u16; epr * rows_pe * HIDDEN];
    for e in 0..epr {
        ensure!(counts[e] as usize == want[e].len(), "rank {me} expert {e}: {} rows, expected {}", counts[e], want[e].len());
        let mut by_key: HashMap<_, _> = want[e].iter().map(|r| ((r.src_rank, r.src_token, r.slot), r)).collect();
        for j in 0..counts[e] as usize {
            let row = e * rows_pe + j;
            let m = meta[row] as usize;
            let key = (m >> 24, m & 0xffff, (m >> 16) & 0xff);
            let r = by_key.remove(&key).with_context(|| format!("rank {me} expert {e} row {j}: unexpected source {key:?}"))?;
            ensure!(x[row * HIDDEN..(row + 1) * HIDDEN] == r.payload[..], "rank {me} expert {e} row {j}: FP8 row differs");
            let got: Vec<u8> = sc[row * groups..(row + 1) * groups].iter().flat_map(|v| v.to_le_bytes()).collect();
            ensure!(got == r.scales, "rank {me} expert {e} row {j}: scales differ");
            y[row * HIDDEN..(row + 1) * HIDDEN].copy_from_slice(&expert_output(me * epr + e, key.0, key.1, key.2));
        }
        ensure!(by_key.is_empty(), "rank {me} expert {e}: {} rows missing", by_key.len());
    }
    let y = s.clone_htod(&y.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
    let idx = &w.topk_idx[me];
    let y_of = |t: usize, j: usize| expert_output(idx[t * TOPK + j] as usize, me, t, j);
    for mode in [CombineMode::PerExpert, CombineMode::PreReduced] {
        let out = s.clone_htod(&vec![bf16::from_bits(0xffff); TOKENS * HIDDEN])?;
        buf.combine(s, &h, &combine_args(inp, &y, &out, mode, false))?;
        buf.check()?;
        let got: Vec<u16> = s.clone_dtoh(&out)?.iter().map(|v| v.to_bits()).collect();
        let want = match mode {
            CombineMode::PerExpert => w.combine(me, &y_of),
            CombineMode::PreReduced => w.combine_pre_reduced(me, &y_of),
        };
        let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        ensure!(bad == 0, "rank {me}: {mode:?} combine differs from the reference in {bad} of {} values", want.len());
    }
    Ok(y)
}

/// Microseconds of `f` on `s`, started right after a GPU barrier (outside the timing), so every
/// rank enters together; and the host microseconds of the call itself (the launch cost). The
/// barrier holds for `hold` first, so `f`'s work is queued before the timing starts (unless
/// `hold` is shorter than the host's launch).
fn timed(g: &Group, s: &Arc<CudaStream>, hold: Duration, f: &mut dyn FnMut() -> moe_ep::Result<()>) -> Result<(f64, f64)> {
    let ctx = s.context();
    let (a, b) = (ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?);
    diag::launch_held_barrier(g, s, hold)?;
    a.record(s)?;
    let t0 = Instant::now();
    f()?;
    let host = t0.elapsed().as_secs_f64() * 1e6;
    b.record(s)?;
    b.synchronize()?;
    Ok((a.elapsed_ms(&b)? as f64 * 1e3, host))
}

/// Medians (us) of dispatch, combine per expert, combine pre-reduced (and, with `halves`, the
/// hook-mode halves) over `iters` runs after a warm-up; then the host time of the first three
/// calls (medians, us).
#[allow(clippy::too_many_arguments)]
fn measure(
    g: &Group,
    buf: &mut LlBuffer,
    inp: &Inputs,
    y: &CudaSlice<bf16>,
    out: &dyn DeviceArg<bf16>,
    iters: usize,
    halves: bool,
    hold: Duration,
) -> Result<Vec<f64>> {
    let s = g.stream();
    let nops = if halves { 7 } else { 3 };
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); nops + 3];
    for it in 0..10 + iters {
        let mut t = vec![(0f64, 0f64); nops];
        let mut h = None;
        t[0] = timed(g, s, hold, &mut || {
            h = Some(buf.dispatch(s, &fp8_args(inp, false))?.0);
            Ok(())
        })?;
        let h = h.take().context("dispatch handle")?;
        t[1] = timed(g, s, hold, &mut || buf.combine(s, &h, &combine_args(inp, y, out, CombineMode::PerExpert, false)).map(|_| ()))?;
        t[2] = timed(g, s, hold, &mut || buf.combine(s, &h, &combine_args(inp, y, out, CombineMode::PreReduced, false)).map(|_| ()))?;
        if halves {
            let mut hh = None;
            t[3] = timed(g, s, hold, &mut || {
                hh = Some(buf.dispatch(s, &fp8_args(inp, true))?.0);
                Ok(())
            })?;
            let mut hh = hh.take().context("dispatch handle")?;
            t[4] = timed(g, s, hold, &mut || buf.dispatch_recv(s, &mut hh, None).map(|_| ()))?;
            let mut pending = None;
            t[5] = timed(g, s, hold, &mut || {
                pending = buf.combine(s, &hh, &combine_args(inp, y, out, CombineMode::PreReduced, true))?.0;
                Ok(())
            })?;
            let mut p = pending.take();
            t[6] = timed(g, s, hold, &mut || buf.combine_recv(s, p.as_mut().expect("hook mode returns the receive half")).map(|_| ()))?;
        }
        if it >= 10 {
            for (v, x) in samples.iter_mut().zip(&t) {
                v.push(x.0);
            }
            for (v, x) in samples[nops..].iter_mut().zip(&t) {
                v.push(x.1);
            }
        }
    }
    buf.check()?;
    Ok(samples.iter_mut().map(|v| median(v)).collect())
}

/// Traced runs of the breakdown.
const TRACED_RUNS: usize = 20;
/// The marks the breakdown reports, and their names.
const MARKS: [(usize, &str); 6] = [
    (trace::START, "all blocks started"),
    (trace::SENT, "stores issued"),
    (trace::SIGNALLED, "stores complete, ranks signalled"),
    (trace::ARRIVED, "every source arrived"),
    (trace::DONE, "placed / reduced"),
    (trace::END, "end"),
];

/// Medians over `runs` traced calls (each timed as in [`measure`]) of where the FP8 dispatch
/// and then the pre-reduced combine spend their time: for each of [`MARKS`], microseconds from
/// the rank's first block start until the last block reached it (GPU clock).
fn trace_breakdown(
    g: &Group,
    buf: &mut LlBuffer,
    inp: &Inputs,
    y: &CudaSlice<bf16>,
    out: &dyn DeviceArg<bf16>,
    runs: usize,
    hold: Duration,
) -> Result<Vec<f64>> {
    let s = g.stream();
    buf.take_trace(s)?;
    let mut samples = vec![Vec::new(); 2 * MARKS.len()];
    for _ in 0..runs {
        let mut h = None;
        timed(g, s, hold, &mut || {
            h = Some(buf.dispatch(s, &fp8_args(inp, false))?.0);
            Ok(())
        })?;
        let h = h.context("dispatch handle")?;
        timed(g, s, hold, &mut || buf.combine(s, &h, &combine_args(inp, y, out, CombineMode::PreReduced, false)).map(|_| ()))?;
        let t = buf.take_trace(s)?;
        for (k, rows) in [&t.dispatch, &t.combine].into_iter().enumerate() {
            let t0 = rows.iter().map(|r| r[trace::START]).min().unwrap_or(0);
            for (j, &(m, _)) in MARKS.iter().enumerate() {
                let latest = rows.iter().map(|r| r[m]).max().unwrap_or(0);
                samples[MARKS.len() * k + j].push(latest.saturating_sub(t0) as f64 / 1e3);
            }
        }
    }
    buf.check()?;
    Ok(samples.iter_mut().map(|v| median(v)).collect())
}

/// Slowest rank per value (rank 0 only).
fn slowest(all: &[Vec<f64>]) -> Vec<f64> {
    (0..all[0].len()).map(|i| all.iter().map(|v| v[i]).fold(0.0, f64::max)).collect()
}

pub fn run(g: &Group, o: &Opts, rep: &mut Report) -> Result<()> {
    let world = g.world();
    let me = g.rank();
    let s = g.stream();
    // 256 experts, rounded up to a multiple of the rank count where it does not divide.
    let experts = EXPERTS.div_ceil(world) * world;
    let iters = o.iters.max(50) * 2;
    let device = g.device_name().to_string();
    let hold = Duration::from_micros(o.hold_us);

    // The main point: DeepEP's setup, one block per SM.
    let w = world_inputs(world, experts, TOKENS);
    let inp = upload(s, &w, me)?;
    let mut buf = LlBuffer::new(g, LlConfig::new(experts, HIDDEN, TOPK, TOKENS))?;
    let y = check(g, &mut buf, &w, &inp).context("checking the low-latency kernels against the CPU reference")?;
    let out = s.alloc_zeros::<bf16>(TOKENS * HIDDEN)?;
    g.host_barrier()?;
    let mut main = measure(g, &mut buf, &inp, &y, &out, iters, true, hold)?;
    let host = main.split_off(OPS.len());
    let grid = buf.config().num_blocks;
    let threads = buf.config().threads;
    // Where the time goes: the kernels' timestamps, in traced runs after the timed ones.
    buf.enable_trace()?;
    let breakdown = trace_breakdown(g, &mut buf, &inp, &y, &out, TRACED_RUNS, hold)?;
    buf.disable_trace();
    let launched = (g.launch_threads(moe_ep::Kernel::LlDispatch, threads), g.launch_threads(moe_ep::Kernel::LlCombine, threads));

    // Grid sizes: the smallest that keeps the figures.
    let grids: Vec<u32> = if o.quick { vec![] } else { [16u32, 24, 32, 48, 64, 96].into_iter().filter(|&b| b < g.sm_count()).collect() };
    let mut by_grid = Vec::new();
    for &b in &grids {
        buf.set_launch(b, threads)?;
        by_grid.push((b, measure(g, &mut buf, &inp, &y, &out, iters / 2, false, hold)?[..3].to_vec()));
    }
    buf.set_launch(grid, threads)?;

    // The flag round trip in the same run.
    let mut rtt = f64::NAN;
    for _ in 0..2 {
        rtt = match me {
            0 => diag::ping_pong(g, 1, true, 2000)?.unwrap_or(f64::NAN),
            1 => {
                diag::ping_pong(g, 0, false, 2000)?;
                f64::NAN
            }
            _ => {
                g.barrier()?;
                f64::NAN
            }
        };
    }
    drop(buf);

    // Tokens per rank, 1 to 512.
    let sweep: Vec<usize> = if o.sweep { vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512] } else { vec![] };
    let mut by_tokens = Vec::new();
    if !sweep.is_empty() {
        let t_max = *sweep.last().unwrap();
        let mut sbuf = LlBuffer::new(g, LlConfig::new(experts, HIDDEN, TOPK, t_max))?;
        let mut ys = s.alloc_zeros::<bf16>(experts / world * world * t_max * HIDDEN)?;
        let outs = s.alloc_zeros::<bf16>(t_max * HIDDEN)?;
        // Non-zero expert outputs (the timing does not depend on the values; the main point
        // above checked them).
        let vals: Vec<bf16> = gen_bf16(&mut Rng::new(3), ys.len(), 1.0).iter().map(|&b| bf16::from_bits(b)).collect();
        s.memcpy_htod(&vals, &mut ys)?;
        for &n in &sweep {
            let wn = world_inputs(world, experts, n);
            let inp_n = upload(s, &wn, me)?;
            g.host_barrier()?;
            // The output holds exactly this call's tokens.
            let out_n = outs.slice(0..n * HIDDEN);
            by_tokens.push((n, measure(g, &mut sbuf, &inp_n, &ys, &out_n, iters / 2, false, hold)?[..3].to_vec()));
        }
    }

    let mut vals = main.clone();
    vals.push(rtt);
    for (_, v) in &by_grid {
        vals.extend(v);
    }
    for (_, v) in &by_tokens {
        vals.extend(v);
    }
    vals.extend(&host);
    vals.extend(&breakdown);
    let Some(all) = Report::gather(g, &vals)? else { return Ok(()) };
    let nb = breakdown.len();
    let bd: Vec<&[f64]> = all.iter().map(|v| &v[v.len() - nb..]).collect();
    let worst = slowest(&all);
    let mut rows = Vec::new();
    for (r, v) in all.iter().enumerate() {
        let mut row = vec![r.to_string()];
        row.extend(v[..7].iter().map(|x| format!("{x:.1}")));
        rows.push(row);
    }
    let mut srow = vec!["slowest".to_string()];
    srow.extend(worst[..7].iter().map(|x| format!("{x:.1}")));
    rows.push(srow);
    let mut head = vec!["rank"];
    head.extend(OPS);
    let mut body = format!(
        "{device}, {world} ranks. {TOKENS} tokens per rank, hidden {HIDDEN}, top-{TOPK} of {experts}, FP8 dispatch (f32 scales, weights travel), BF16 combine; {grid} blocks; threads per block launched: dispatch {}, combine {}; microseconds, each operation timed from a common start (a GPU barrier precedes it, outside the timing; {start}), medians of {iters} runs.\n\nChecked against the CPU reference before timing, on this machine, at the main point: the FP8 dispatch (every received row, scale, count and source) and both combine modes with non-zero expert outputs, bit for bit. The grid sizes and the token sweep below run the same paths and are timed only (the GPU tests check other shapes).\n\n",
        launched.0,
        launched.1,
        start = if o.hold_us > 0 {
            format!(
                "the barrier holds {} us on the GPU first, so the call is already queued when the timing starts and its launch cost, given below as host time, is left out",
                o.hold_us
            )
        } else {
            "the barrier does not hold, so the timing also holds part of the host's launch".to_string()
        },
    );
    body += &table(&head, &rows);
    body += &format!(
        "\nSlowest rank: dispatch + combine {:.1} us (pre-reduced), {:.1} us (per expert). Flag round trip in the same run (rank 0 <-> rank 1): {:.2} us{}.\n",
        worst[0] + worst[2],
        worst[0] + worst[1],
        all[0][7],
        if g.gpu_sharers() > 1 { " (processes sharing one GPU under CUDA MPS, not an NVLink figure; the times above mean nothing)" } else { "" }
    );
    let h = &worst[worst.len() - 3 - nb..worst.len() - nb];
    body += &format!(
        "Host time of one call (the Rust API: checks, parameter block, launch, completion event; CPU time, median, slowest rank): dispatch {:.1} us, combine per expert {:.1} us, combine pre-reduced {:.1} us.\n",
        h[0], h[1], h[2]
    );
    let mut brows = Vec::new();
    for (r, v) in bd.iter().enumerate() {
        for (k, name) in ["dispatch (FP8)", "combine (pre-reduced)"].iter().enumerate() {
            let mut row = vec![r.to_string(), name.to_string()];
            row.extend(v[MARKS.len() * k..MARKS.len() * (k + 1)].iter().map(|x| format!("{x:.1}")));
            brows.push(row);
        }
    }
    let mut bhead = vec!["rank", "kernel"];
    bhead.extend(MARKS.iter().map(|m| m.1));
    body += &format!(
        "\nWhere the time goes: GPU timestamps (`%globaltimer`) that thread 0 of every block stamps at the kernels' marks, in microseconds from the rank's first block start until the last block reached the mark; medians of {TRACED_RUNS} traced runs after the timed ones (a mark costs one store per block). The main table's time also holds the gap from the barrier to the first block's start.\n\n"
    );
    body += &table(&bhead, &brows);
    let mut at = 8;
    if !by_grid.is_empty() {
        let mut grows = Vec::new();
        let mut rows_csv = Vec::new();
        for &(b, _) in &by_grid {
            let v = &worst[at..at + 3];
            grows.push(vec![b.to_string(), format!("{:.1}", v[0]), format!("{:.1}", v[1]), format!("{:.1}", v[2])]);
            rows_csv.push((b, v.to_vec()));
            at += 3;
        }
        grows.push(vec![format!("{grid} (default)"), format!("{:.1}", worst[0]), format!("{:.1}", worst[1]), format!("{:.1}", worst[2])]);
        body += "\nGrid size (blocks, one per SM), slowest rank, us:\n\n";
        body += &table(&["blocks", "dispatch", "combine (per expert)", "combine (pre-reduced)"], &grows);
        let keep = |i: usize| -> u32 { rows_csv.iter().find(|(_, v)| v[i] <= worst[i] * 1.05).map_or(grid, |(b, _)| *b) };
        body += &format!(
            "\nSmallest grid within 5% of the {grid}-block figure: dispatch {} blocks, combine per expert {} blocks, combine pre-reduced {} blocks.\n",
            keep(0),
            keep(1),
            keep(2)
        );
    }
    if !by_tokens.is_empty() {
        let mut trows = Vec::new();
        let mut csv = vec!["tokens,dispatch_us,combine_per_expert_us,combine_pre_reduced_us".to_string()];
        let mut series: Vec<Series> = ["dispatch", "combine (per expert)", "combine (pre-reduced)"].iter().map(|n| Series::line(n)).collect();
        for &(n, _) in &by_tokens {
            let v = &worst[at..at + 3];
            trows.push(vec![n.to_string(), format!("{:.1}", v[0]), format!("{:.1}", v[1]), format!("{:.1}", v[2])]);
            csv.push(format!("{n},{:.2},{:.2},{:.2}", v[0], v[1], v[2]));
            for (sr, &x) in series.iter_mut().zip(v) {
                sr.points.push((n as f64, x));
            }
            at += 3;
        }
        // DeepEP V1 on the same kind of machine (ANCHORS.md), where it was measured.
        let anchors: &[(f64, f64, f64)] = match world {
            4 => &[(128.0, 33.5, 58.5), (256.0, 57.8, 103.4)],
            2 => &[(128.0, 28.4, 41.1)],
            _ => &[],
        };
        if !anchors.is_empty() {
            series.push(Series::points("DeepEP V1 dispatch (ANCHORS, 4 x H200)", anchors.iter().map(|a| (a.0, a.1)).collect()));
            series.push(Series::points("DeepEP V1 combine (ANCHORS, 4 x H200)", anchors.iter().map(|a| (a.0, a.2)).collect()));
        }
        body += &format!("\nTokens per rank, {grid} blocks, slowest rank, us (plot: ll_latency.svg):\n\n");
        body += &table(&["tokens/rank", "dispatch", "combine (per expert)", "combine (pre-reduced)"], &trows);
        rep.files.push(("ll_sweep.csv".into(), csv.join("\n") + "\n"));
        rep.files.push((
            "ll_latency.svg".into(),
            line_chart(
                &format!("moe-ep low-latency EP{world}, {device}, {grid} blocks"),
                "tokens per rank",
                "latency, us (slowest rank)",
                &series,
                true,
            ),
        ));
    }
    rep.section(&format!("Low-latency, EP{world}"), body);
    Ok(())
}
