//! High-throughput benchmark: DeepEP's defaults, NCCL all-to-all baseline, P2P limit, sweeps
//! over tokens per rank and SM budget (plotted against those baselines and DeepEP's figures),
//! and the combine push/reduce split tuning (`tune`).

use crate::report::{Report, Series, line_chart, table};
use crate::{Opts, median};
use anyhow::{Context, Result, ensure};
use cudarc::driver::{CudaSlice, CudaStream, sys};
use half::bf16;
use moe_ep::diag::{CopyEngine, P2pProbe};
use moe_ep::ht::{CombineArgs, DispatchArgs, Handle, HtBuffer, HtConfig, Payload, PushEngine};
use moe_ep::reference::{HtRank, HtWorld, Rng, Routing, gen_bf16, gen_fp8, gen_routing};
use moe_ep::{Group, Kernel, TopkIdx};
use std::sync::Arc;

const EXPERTS: usize = 256;
const HIDDEN: usize = 7168;
const TOPK: usize = 8;
const SEED: u64 = 20261128;
/// Token counts above this are timed but not checked against the CPU reference (generating
/// every rank's inputs and the expected rows on the host takes longer than the timing).
const CHECK_MAX_TOKENS: usize = 4096;

/// 256 experts, rounded up to a multiple of the rank count where it does not divide.
fn experts(world: usize) -> usize {
    EXPERTS.div_ceil(world) * world
}

/// One rank's inputs (regenerable by every rank from the seed): BF16 rows and routing, and the
/// same tokens as FP8 with scales.
fn rank_inputs(r: usize, n: usize, world: usize) -> (HtRank, HtRank) {
    let mut rng = Rng::new(SEED ^ (r as u64 + 1) ^ (n as u64) << 20);
    let (topk_idx, topk_weights) = gen_routing(&mut rng, n, TOPK, experts(world), world, Routing::Scores, 0.0);
    let x = bytemuck::cast_slice(&gen_bf16(&mut rng, n * HIDDEN, 1.0)).to_vec();
    let (q, s) = gen_fp8(&mut rng, n, HIDDEN);
    let bf = HtRank { x, scales: None, topk_idx: topk_idx.clone(), topk_weights: topk_weights.clone() };
    (bf, HtRank { x: q, scales: Some(s), topk_idx, topk_weights })
}

/// Per-rank figures of one configuration.
struct Point {
    /// Median microseconds: layout, full BF16, cached BF16, cached FP8, full FP8, combine.
    us: [f64; 6],
    num_recv: usize,
    /// Rows this rank sends to other ranks, and receives from other ranks.
    remote_sent: usize,
    remote_recv: usize,
}

const OPS: [&str; 6] = ["layout", "dispatch BF16 (full)", "dispatch BF16 (cached)", "dispatch FP8 (cached)", "dispatch FP8 (full)", "combine BF16"];

/// Every timed path against the CPU reference, whole outputs, receive buffers poisoned before
/// each dispatch: full and cached BF16 dispatch, full and cached FP8 dispatch (rows and scales),
/// combine.
#[allow(clippy::too_many_arguments)]
fn check_paths(
    g: &Group,
    buf: &mut HtBuffer,
    h: &mut Handle,
    n: usize,
    bf16_args: &DispatchArgs<'_>,
    fp8_args: &DispatchArgs<'_>,
    y: &CudaSlice<bf16>,
    out: &CudaSlice<bf16>,
) -> Result<()> {
    let (world, me, s) = (g.world(), g.rank(), g.stream());
    let inputs: Vec<(HtRank, HtRank)> = (0..world).map(|r| rank_inputs(r, n, world)).collect();
    let wb =
        HtWorld { num_experts: experts(world), hidden: HIDDEN, k: TOPK, row_bytes: 2 * HIDDEN, ranks: inputs.iter().map(|i| i.0.clone()).collect() };
    let wq = HtWorld { row_bytes: HIDDEN, ranks: inputs.into_iter().map(|i| i.1).collect(), ..wb.clone() };
    let want = wb.dispatch(me, 1);
    let want_q = wq.dispatch(me, 1);
    let num_recv = h.num_recv().context("the checked dispatch waits for counts")?;
    ensure!(num_recv == want.num_recv, "rank {me}: {num_recv} rows received, expected {}", want.num_recv);
    let bf16_rows = |buf: &HtBuffer, h: &Handle| -> Result<Vec<u8>> { Ok(bytemuck::cast_slice(&buf.recv_x_bf16(h)?.to_vec(s)?).to_vec()) };
    ensure!(bf16_rows(buf, h)? == want.x, "rank {me}: full BF16 dispatch differs from the reference");
    // Combine: every rank's expert outputs are the first rows of the same random tensor.
    let yv = y.slice(0..num_recv * HIDDEN);
    buf.combine(s, h, &CombineArgs { x: &yv, topk_weights: None, bias: [None, None], out, out_weights: None })?;
    buf.check()?;
    let yall = gen_bf16(&mut Rng::new(7), world * n * HIDDEN, 1.0);
    let (want_out, _) = wb.combine(me, &|_| &yall[..], None, None, None);
    let got: Vec<u16> = s.clone_dtoh(out)?.iter().map(|v| v.to_bits()).collect();
    ensure!(got == want_out, "rank {me}: combine differs from the reference");
    buf.poison(s, 0xEE)?;
    buf.cached_dispatch(s, h, bf16_args)?;
    buf.check()?;
    ensure!(bf16_rows(buf, h)? == want.x, "rank {me}: cached BF16 dispatch differs from the reference");
    for cached in [false, true] {
        buf.poison(s, 0x5A)?;
        if cached {
            buf.cached_dispatch(s, h, fp8_args)?;
        } else {
            buf.dispatch_into(s, h, &DispatchArgs { wait_for_counts: true, ..*fp8_args })?;
        }
        buf.check()?;
        ensure!(buf.recv_x_fp8(h)?.to_vec(s)? == want_q.x, "rank {me}: FP8 dispatch (cached: {cached}) rows differ from the reference");
        let sc: Vec<u32> = buf.recv_scales(h)?.to_vec(s)?.iter().map(|v| v.to_bits()).collect();
        ensure!(sc == want_q.scales.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "rank {me}: FP8 dispatch (cached: {cached}) scales differ");
    }
    Ok(())
}

fn measure(g: &Group, buf: &mut HtBuffer, n: usize, iters: usize, check: bool) -> Result<Point> {
    let world = g.world();
    let me = g.rank();
    let s = g.stream();
    let (mine, mine_q) = rank_inputs(me, n, world);
    let up = |v: &[u8]| -> Result<CudaSlice<u8>> { Ok(s.clone_htod(if v.is_empty() { &[0u8][..] } else { v })?) };
    let x = s.clone_htod(&mine.x.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect::<Vec<_>>())?;
    let idx = s.clone_htod(&mine.topk_idx)?;
    let wts = s.clone_htod(&mine.topk_weights)?;
    let xq = up(&mine_q.x)?;
    let xs = s.clone_htod(mine_q.scales.as_deref().unwrap_or(&[0.0]))?;
    let y = s.clone_htod(&gen_bf16(&mut Rng::new(7), world * n * HIDDEN, 1.0).iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
    let out = s.alloc_zeros::<bf16>(n * HIDDEN)?;
    let topk = TopkIdx::I64(&idx);
    let layout = buf.layout(s, topk, TOPK)?;
    let bf16_args =
        DispatchArgs { x: Payload::Bf16(&x), topk_idx: Some(topk), topk_weights: Some(&wts), expert_alignment: 1, wait_for_counts: false };
    let fp8_args = DispatchArgs { x: Payload::Fp8 { x: &xq, scales: &xs }, ..bf16_args };

    let (mut h, _) = buf.dispatch(s, &layout, &DispatchArgs { wait_for_counts: true, ..bf16_args })?;
    let num_recv = h.num_recv().context("counts")?;
    let ref_layout = moe_ep::reference::layout(&mine.topk_idx, TOPK, experts(world), world);
    let remote_sent: usize = (0..world).filter(|&r| r != me).map(|r| ref_layout.tokens_per_rank[r] as usize).sum();
    let remote_recv = num_recv - ref_layout.tokens_per_rank[me] as usize;
    if check {
        check_paths(g, buf, &mut h, n, &bf16_args, &fp8_args, &y, &out).context("checking against the CPU reference")?;
        buf.dispatch_into(s, &mut h, &DispatchArgs { wait_for_counts: true, ..bf16_args })?;
    }
    g.host_barrier()?;

    // Timing: back-to-back, events between operations, medians per operation.
    let ctx = s.context();
    let ev = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let warm = 5;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 6];
    let yv = y.slice(0..num_recv * HIDDEN);
    let cargs = CombineArgs { x: &yv, topk_weights: None, bias: [None, None], out: &out, out_weights: None };
    for it in 0..warm + iters {
        let e: Vec<_> = (0..9).map(|_| ev()).collect::<Result<_, _>>()?;
        e[0].record(s)?;
        buf.layout_into(s, topk, &layout)?;
        e[1].record(s)?;
        buf.dispatch_into(s, &mut h, &bf16_args)?;
        e[2].record(s)?;
        buf.combine(s, &h, &cargs)?;
        e[3].record(s)?;
        buf.cached_dispatch(s, &mut h, &bf16_args)?;
        e[4].record(s)?;
        buf.combine(s, &h, &cargs)?;
        e[5].record(s)?;
        buf.cached_dispatch(s, &mut h, &fp8_args)?;
        e[6].record(s)?;
        buf.dispatch_into(s, &mut h, &fp8_args)?;
        e[7].record(s)?;
        // Leave the handle as a BF16 dispatch for the next iteration's combines.
        buf.dispatch_into(s, &mut h, &bf16_args)?;
        e[8].record(s)?;
        e[8].synchronize()?;
        if it >= warm {
            let t = |a: usize, b: usize| -> Result<f64> { Ok(e[a].elapsed_ms(&e[b])? as f64 * 1e3) };
            samples[0].push(t(0, 1)?);
            samples[1].push(t(1, 2)?);
            samples[5].push(t(2, 3)?);
            samples[2].push(t(3, 4)?);
            samples[5].push(t(4, 5)?);
            samples[3].push(t(5, 6)?);
            samples[4].push(t(6, 7)?);
            samples[1].push(t(7, 8)?);
        }
    }
    buf.check()?;
    let mut us = [0f64; 6];
    for (i, v) in samples.iter_mut().enumerate() {
        us[i] = median(v);
    }
    Ok(Point { us, num_recv, remote_sent, remote_recv })
}

/// Logical and physical GB/s of each operation from a gathered point
/// (`[us x6, num_recv, remote_sent, remote_recv]`).
fn rates(p: &[f64]) -> Vec<(f64, f64)> {
    let (nr, rs, rr) = (p[6], p[7], p[8]);
    let bf16_row = 2.0 * HIDDEN as f64;
    let fp8_row = HIDDEN as f64 + 4.0 * HIDDEN as f64 / 128.0;
    let gbs = |bytes: f64, us: f64| bytes / (us * 1e-6) / 1e9;
    vec![
        (f64::NAN, f64::NAN),
        (gbs(nr * bf16_row, p[1]), gbs(rs * bf16_row, p[1])),
        (gbs(nr * bf16_row, p[2]), gbs(rs * bf16_row, p[2])),
        (gbs(nr * fp8_row, p[3]), gbs(rs * fp8_row, p[3])),
        (gbs(nr * fp8_row, p[4]), gbs(rs * fp8_row, p[4])),
        (gbs(nr * bf16_row, p[5]), gbs(rr * bf16_row, p[5])),
    ]
}

fn point_vals(p: &Point) -> Vec<f64> {
    let mut v = p.us.to_vec();
    v.extend([p.num_recv as f64, p.remote_sent as f64, p.remote_recv as f64]);
    v
}

/// Slowest rank of a gathered point: (us, logical GB/s, NVLink GB/s) per operation.
fn slowest(all: &[Vec<f64>]) -> Vec<(f64, f64, f64)> {
    (0..6)
        .map(|i| {
            let mut w = (0f64, f64::MAX, f64::MAX);
            for v in all {
                let rt = rates(v);
                w = (w.0.max(v[i]), w.1.min(rt[i].0), w.2.min(rt[i].1));
            }
            w
        })
        .collect()
}

/// NCCL all-to-all of the same traffic (rows deduplicated per rank, BF16): medians of
/// (dispatch-like us, combine-like us) over `iters` samples, or why it could not run. Counts
/// are known up front; only the data movement is timed. The all-to-alls run back to back with
/// an event between each, so every timed one was queued while the previous ran (as moe-ep's
/// operations are), and the first ones are warm-up.
fn nccl_baseline(g: &Group, n: usize, iters: usize) -> Result<std::result::Result<(f64, f64), String>> {
    use cudarc::nccl::{Comm, Id, result as nr};
    // SAFETY: only probes the dynamic loader.
    let present = unsafe { cudarc::nccl::sys::is_culib_present() };
    if !g.all_gather_bytes(&[present as u8])?.iter().all(|b| b[0] == 1) {
        return Ok(Err("libnccl.so not found on some rank (put NCCL's lib directory on LD_LIBRARY_PATH)".into()));
    }
    let (world, me) = (g.world(), g.rank());
    let nerr = |what: &'static str| move |e: cudarc::nccl::result::NcclError| anyhow::anyhow!("{what}: {e:?}");
    let bytes: Vec<u8> = if me == 0 { Id::new().map_err(nerr("ncclGetUniqueId"))?.internal().iter().map(|&c| c as u8).collect() } else { vec![] };
    let ids = g.all_gather_bytes(&bytes)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (d, &b) in internal.iter_mut().zip(&ids[0]) {
        *d = b as std::ffi::c_char;
    }
    let s: Arc<CudaStream> = g.stream().clone();
    let comm = Comm::from_rank(s.clone(), me, world, Id::uninit(internal)).map_err(nerr("ncclCommInitRank"))?;
    // counts[src][dst]: rows rank src sends to rank dst.
    let counts: Vec<Vec<usize>> = (0..world)
        .map(|src| {
            let (rk, _) = rank_inputs(src, n, world);
            moe_ep::reference::layout(&rk.topk_idx, TOPK, experts(world), world).tokens_per_rank.iter().map(|&c| c as usize).collect()
        })
        .collect();
    let row = 2 * HIDDEN;
    let out_rows: Vec<usize> = (0..world).map(|r| counts[me][r]).collect();
    let in_rows: Vec<usize> = (0..world).map(|r| counts[r][me]).collect();
    let a = s.alloc_zeros::<u8>(out_rows.iter().sum::<usize>() * row + 1)?;
    let mut b = s.alloc_zeros::<u8>(in_rows.iter().sum::<usize>() * row + 1)?;
    let mut c = s.alloc_zeros::<u8>(out_rows.iter().sum::<usize>() * row + 1)?;
    // One all-to-all: send `sends[r]` rows from `src` to each r, receive `recvs[r]` into `dst`.
    let alltoall = |src: &CudaSlice<u8>, sends: &[usize], dst: &mut CudaSlice<u8>, recvs: &[usize]| -> Result<()> {
        nr::group_start().map_err(nerr("ncclGroupStart"))?;
        let (mut so, mut ro) = (0, 0);
        for r in 0..world {
            let (sn, rn) = (sends[r] * row, recvs[r] * row);
            if sn > 0 {
                comm.send(&src.slice(so..so + sn), r as i32).map_err(nerr("ncclSend"))?;
            }
            if rn > 0 {
                comm.recv(&mut dst.slice_mut(ro..ro + rn), r as i32).map_err(nerr("ncclRecv"))?;
            }
            so += sn;
            ro += rn;
        }
        nr::group_end().map_err(nerr("ncclGroupEnd"))?;
        Ok(())
    };
    let ctx = s.context().clone();
    let warm = 5;
    let events: Vec<_> = (0..=2 * (warm + iters)).map(|_| ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))).collect::<Result<_, _>>()?;
    g.host_barrier()?;
    events[0].record(&s)?;
    for i in 0..warm + iters {
        alltoall(&a, &out_rows, &mut b, &in_rows)?;
        events[2 * i + 1].record(&s)?;
        alltoall(&b, &in_rows, &mut c, &out_rows)?;
        events[2 * i + 2].record(&s)?;
    }
    events[2 * (warm + iters)].synchronize()?;
    let (mut fwd, mut rev) = (Vec::new(), Vec::new());
    for i in warm..warm + iters {
        fwd.push(events[2 * i].elapsed_ms(&events[2 * i + 1])? as f64 * 1e3);
        rev.push(events[2 * i + 1].elapsed_ms(&events[2 * i + 2])? as f64 * 1e3);
    }
    Ok(Ok((median(&mut fwd), median(&mut rev))))
}

/// DeepEP V1 on 4 x H200 (ANCHORS.md), EP4, logical GB/s: (SMs, FP8 dispatch, BF16 dispatch,
/// combine) at 4096 tokens, and (tokens, ...) at 24 SMs.
const DEEPEP_EP4_SMS: [(f64, f64, f64, f64); 4] =
    [(8.0, 89.0, 90.0, 151.0), (16.0, 174.0, 177.0, 274.0), (24.0, 255.0, 261.0, 358.0), (32.0, 323.0, 332.0, 387.0)];
const DEEPEP_EP4_TOKENS: [(f64, f64, f64, f64); 3] = [(1024.0, 209.0, 230.0, 283.0), (4096.0, 255.0, 261.0, 358.0), (8192.0, 263.0, 267.0, 378.0)];

/// Chart series for a sweep: moe-ep's three curves, DeepEP's figures where ANCHORS.md has them
/// for this rank count, and the same-run P2P limit and NCCL baseline as levels.
/// A sweep's points: (x, the slowest rank's (us, logical, NVLink GB/s) per operation).
type SweepPoints = [(f64, Vec<(f64, f64, f64)>)];

fn sweep_series(world: usize, pts: &SweepPoints, deepep: &[(f64, f64, f64, f64)], levels: &[(String, f64)]) -> Vec<Series> {
    let mut v = Vec::new();
    for (name, i) in [("moe-ep dispatch BF16 (cached)", 2), ("moe-ep dispatch FP8 (cached)", 3), ("moe-ep combine", 5)] {
        v.push(Series { points: pts.iter().map(|(x, w)| (*x, w[i].1)).collect(), ..Series::line(name) });
    }
    if world == 4 {
        v.push(Series::points("DeepEP V1 dispatch BF16 (ANCHORS, 4 x H200)", deepep.iter().map(|d| (d.0, d.2)).collect()));
        v.push(Series::points("DeepEP V1 dispatch FP8 (ANCHORS, 4 x H200)", deepep.iter().map(|d| (d.0, d.1)).collect()));
        v.push(Series::points("DeepEP V1 combine (ANCHORS, 4 x H200)", deepep.iter().map(|d| (d.0, d.3)).collect()));
    }
    for (name, y) in levels {
        if y.is_finite() {
            v.push(Series::level(name, *y));
        }
    }
    v
}

pub fn run(g: &Group, o: &Opts, rep: &mut Report) -> Result<()> {
    let world = g.world();
    let device = g.device_name().to_string();
    let sweep_tokens: Vec<usize> = if o.sweep { vec![128, 256, 512, 1024, 2048, 4096, 8192] } else { vec![] };
    let sweep_sms: Vec<u32> = if o.sweep { vec![8, 16, 24, 32] } else { vec![] };
    let max_tokens = sweep_tokens.iter().cloned().chain([o.tokens]).max().unwrap();
    let push_engine = if o.bulk_push { PushEngine::Bulk } else { PushEngine::Tuned };
    let cfg = HtConfig {
        num_sms: o.sms,
        combine_push_blocks: o.push,
        combine_push: push_engine,
        ..HtConfig::new(experts(world), HIDDEN, TOPK, max_tokens, world)
    };
    let mut buf = HtBuffer::new(g, cfg).context("creating the high-throughput buffer")?;

    // The main point, DeepEP's defaults.
    let p = measure(g, &mut buf, o.tokens, o.iters, true)?;
    let all = Report::gather(g, &point_vals(&p))?;
    // Baselines in the same run.
    let nccl = if g.gpu_sharers() > 1 {
        Err("not run on a shared GPU (NCCL refuses two ranks on one GPU)".to_string())
    } else {
        nccl_baseline(g, o.tokens, o.iters)?
    };
    let nccl_all = match &nccl {
        Ok((f, r)) => Report::gather(g, &[*f, *r])?.map(Ok),
        Err(e) => {
            let _ = Report::gather(g, &[f64::NAN, f64::NAN])?;
            Some(Err(e.clone()))
        }
    };
    let probe = P2pProbe::new(g, 128 << 20)?;
    g.host_barrier()?;
    let ring = probe.copy_bandwidth(g, g.stream(), (g.rank() + 1) % world, o.sms, CopyEngine::Registers, 4)?;
    let ring_all = Report::gather(g, &[ring])?;
    drop(probe);

    // Sweeps: tokens per rank at the main SM budget, then SM budgets at the main token count.
    let mut by_tokens = Vec::new();
    for &n in &sweep_tokens {
        let pt = measure(g, &mut buf, n, o.iters, n <= CHECK_MAX_TOKENS)?;
        by_tokens.push((n, Report::gather(g, &point_vals(&pt))?));
    }
    let mut by_sms = Vec::new();
    for &sms in &sweep_sms {
        buf.set_launch(sms, buf.config().threads)?;
        let pt = measure(g, &mut buf, o.tokens, o.iters, o.tokens <= CHECK_MAX_TOKENS)?;
        by_sms.push((sms, buf.config().push_blocks(world), Report::gather(g, &point_vals(&pt))?));
    }
    buf.set_launch(o.sms, buf.config().threads)?;

    let (Some(all), Some(nccl_all), Some(ring)) = (all, nccl_all, ring_all) else { return Ok(()) };
    let slow = slowest(&all);
    let mut rows = Vec::new();
    for (r, v) in all.iter().enumerate() {
        let rt = rates(v);
        for i in 0..6 {
            let gb = |x: f64| if i == 0 { "-".to_string() } else { format!("{x:.1}") };
            rows.push(vec![r.to_string(), OPS[i].into(), format!("{:.1}", v[i]), gb(rt[i].0), gb(rt[i].1)]);
        }
    }
    let checked_tokens: Vec<String> = sweep_tokens.iter().filter(|&&n| n <= CHECK_MAX_TOKENS).map(|n| n.to_string()).collect();
    let unchecked: Vec<String> = sweep_tokens.iter().filter(|&&n| n > CHECK_MAX_TOKENS).map(|n| n.to_string()).collect();
    let mut body = format!(
        "{device}, {world} ranks. {} tokens per rank, hidden {HIDDEN}, top-{TOPK} of {} experts, scores |randn|+1, {} SMs (combine: {} pushing blocks, {}); threads per block launched: dispatch {}, combine {}; medians of {} runs.\n\n\
         Checked against the CPU reference before timing (whole outputs, receive buffers poisoned first): full and cached BF16 dispatch, full and cached FP8 dispatch (rows and scales), combine, at the main point, at every SM budget of the sweep and at {} tokens per rank{}.\n\n",
        o.tokens,
        experts(world),
        o.sms,
        buf.config().push_blocks(world),
        match buf.combine_push() {
            (PushEngine::Bulk, n) => format!("bulk push, {n} threads per pushing block"),
            _ => "register push".to_string(),
        },
        g.launch_threads(Kernel::HtDispatch, buf.config().threads),
        g.launch_threads(Kernel::HtCombine, buf.config().threads),
        o.iters,
        if checked_tokens.is_empty() { "no other token count".to_string() } else { checked_tokens.join(", ") },
        if unchecked.is_empty() { String::new() } else { format!(" ({} tokens per rank timed only)", unchecked.join(", ")) },
    );
    body += &table(&["rank", "operation", "us", "logical GB/s", "NVLink GB/s"], &rows);
    body += "\nSlowest rank:\n\n";
    let srows: Vec<Vec<String>> = (0..6)
        .map(|i| {
            let gb = |x: f64| if i == 0 { "-".to_string() } else { format!("{x:.1}") };
            vec![OPS[i].into(), format!("{:.1}", slow[i].0), gb(slow[i].1), gb(slow[i].2)]
        })
        .collect();
    body += &table(&["operation", "us", "logical GB/s", "NVLink GB/s"], &srows);
    let ring_min = ring.iter().map(|v| v[0]).fold(f64::MAX, f64::min);
    // The P2P limit as logical GB/s: a uniformly routed stream sends (R-1)/R of its rows over
    // NVLink, so the link carries that share of the logical bytes.
    let ring_logical = ring_min * world as f64 / (world - 1) as f64;
    body += &format!(
        "\nP2P limit in the same run (every rank storing to its ring neighbour, {} SMs, registers): slowest rank {ring_min:.1} GB/s physical, {ring_logical:.1} GB/s logical. Combine reaches {:.0}% of it, cached BF16 dispatch {:.0}% (NVLink GB/s over the limit).\n",
        o.sms,
        100.0 * slow[5].2 / ring_min,
        100.0 * slow[2].2 / ring_min
    );
    let mut nccl_levels = (f64::NAN, f64::NAN);
    match nccl_all {
        Ok(v) => {
            let f = v.iter().map(|x| x[0]).fold(0.0, f64::max);
            let r = v.iter().map(|x| x[1]).fold(0.0, f64::max);
            let rows_min = all.iter().map(|v| v[6]).fold(f64::MAX, f64::min);
            nccl_levels = (rows_min * 2.0 * HIDDEN as f64 / (f * 1e-6) / 1e9, rows_min * 2.0 * HIDDEN as f64 / (r * 1e-6) / 1e9);
            body += &format!(
                "\nNCCL all-to-all of the same traffic (BF16 rows deduplicated per rank, data movement only, {} samples, slowest rank): dispatch-like {f:.1} us, combine-like {r:.1} us; moe-ep cached dispatch BF16 {:.1} us ({:.2}x), combine {:.1} us ({:.2}x).\n",
                o.iters,
                slow[2].0,
                f / slow[2].0,
                slow[5].0,
                r / slow[5].0
            );
        }
        Err(e) => body += &format!("\nNCCL baseline not run: {e}\n"),
    }
    rep.section(&format!("High-throughput, EP{world}"), body);

    let levels = [
        (format!("P2P limit, {} SMs, same run (logical)", o.sms), ring_logical),
        ("NCCL all-to-all, same run (dispatch-like)".to_string(), nccl_levels.0),
    ];
    let mut csv = vec!["sweep,tokens,sms,push_blocks,op,slowest_us,slowest_logical_gbs,slowest_nvlink_gbs".to_string()];
    if !by_tokens.is_empty() {
        let mut rows = Vec::new();
        let mut pts = Vec::new();
        for (n, all) in &by_tokens {
            let w = slowest(all.as_ref().context("rank 0 gathers")?);
            for i in 1..6 {
                csv.push(format!("tokens,{n},{},{},{},{:.1},{:.1},{:.1}", o.sms, buf.config().push_blocks(world), OPS[i], w[i].0, w[i].1, w[i].2));
            }
            rows.push(vec![n.to_string(), format!("{:.1}", w[2].1), format!("{:.1}", w[3].1), format!("{:.1}", w[1].1), format!("{:.1}", w[5].1)]);
            pts.push((*n as f64, w));
        }
        let body = table(&["tokens/rank", "dispatch BF16 cached", "dispatch FP8 cached", "dispatch BF16 full", "combine"], &rows)
            + &format!("\nLogical GB/s of the slowest rank at {} SMs; plot: ht_tokens.svg (full figures in ht_sweep.csv).\n", o.sms);
        rep.section(&format!("High-throughput, tokens per rank, EP{world}"), body);
        rep.files.push((
            "ht_tokens.svg".into(),
            line_chart(
                &format!("moe-ep high-throughput EP{world}, {device}, {} SMs", o.sms),
                "tokens per rank",
                "logical GB/s (slowest rank)",
                &sweep_series(world, &pts, &DEEPEP_EP4_TOKENS, &levels),
                true,
            ),
        ));
    }
    if !by_sms.is_empty() {
        let mut rows = Vec::new();
        let mut pts = Vec::new();
        for (sms, push, all) in &by_sms {
            let w = slowest(all.as_ref().context("rank 0 gathers")?);
            for i in 1..6 {
                csv.push(format!("sms,{},{sms},{push},{},{:.1},{:.1},{:.1}", o.tokens, OPS[i], w[i].0, w[i].1, w[i].2));
            }
            rows.push(vec![
                sms.to_string(),
                push.to_string(),
                format!("{:.1}", w[2].1),
                format!("{:.1}", w[3].1),
                format!("{:.1}", w[1].1),
                format!("{:.1}", w[5].1),
            ]);
            pts.push((*sms as f64, w));
        }
        let body = table(&["SMs", "combine push blocks", "dispatch BF16 cached", "dispatch FP8 cached", "dispatch BF16 full", "combine"], &rows)
            + &format!("\nLogical GB/s of the slowest rank at {} tokens per rank; plot: ht_sms.svg.\n", o.tokens);
        rep.section(&format!("High-throughput, SM budget, EP{world}"), body);
        rep.files.push((
            "ht_sms.svg".into(),
            line_chart(
                &format!("moe-ep high-throughput EP{world}, {device}, {} tokens per rank", o.tokens),
                "SMs (blocks) per kernel",
                "logical GB/s (slowest rank)",
                &sweep_series(world, &pts, &DEEPEP_EP4_SMS, &levels[1..]),
                false,
            ),
        ));
    }
    if csv.len() > 1 {
        rep.files.push(("ht_sweep.csv".into(), csv.join("\n") + "\n"));
    }
    Ok(())
}

/// `tune`: combine time for every push/reduce split of each SM budget (4096 tokens, the main
/// shape), for each push engine, to choose `HtConfig::tuned_push_blocks` and
/// `HtConfig::tuned_push_engine`.
pub fn tune(g: &Group, o: &Opts, rep: &mut Report) -> Result<()> {
    let world = g.world();
    let s = g.stream();
    let n = o.tokens;
    let mut buf = HtBuffer::new(g, HtConfig::new(experts(world), HIDDEN, TOPK, n, world))?;
    let (mine, _) = rank_inputs(g.rank(), n, world);
    let x = s.clone_htod(&mine.x.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect::<Vec<_>>())?;
    let idx = s.clone_htod(&mine.topk_idx)?;
    let wts = s.clone_htod(&mine.topk_weights)?;
    let layout = buf.layout(s, TopkIdx::I64(&idx), TOPK)?;
    let (h, _) = buf.dispatch(s, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
    let rows = h.num_recv().context("counts")?;
    let y = s.clone_htod(&gen_bf16(&mut Rng::new(7), rows * HIDDEN, 1.0).iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
    let out = s.alloc_zeros::<bf16>(n * HIDDEN)?;
    let ctx = s.context();
    let mut table_rows = Vec::new();
    for (sms, engine) in [8u32, 16, 24, 32].into_iter().flat_map(|s| [(s, PushEngine::Registers), (s, PushEngine::Bulk)]) {
        buf.set_combine_push(engine)?;
        let mut cands: Vec<u32> = [1u32, 2, 3, 4, 5, 6].iter().map(|e| (sms * e / 8).max(1)).filter(|&p| p < sms).collect();
        cands.dedup();
        let mut best = (0u32, f64::MAX);
        let mut line = Vec::new();
        for &push in &cands {
            buf.set_launch(sms, buf.config().threads)?;
            buf.set_combine_push_blocks(push)?;
            let cargs = CombineArgs { x: &y, topk_weights: None, bias: [None, None], out: &out, out_weights: None };
            g.host_barrier()?;
            let events: Vec<_> = (0..=25).map(|_| ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))).collect::<Result<_, _>>()?;
            events[0].record(s)?;
            for e in &events[1..] {
                buf.combine(s, &h, &cargs)?;
                e.record(s)?;
            }
            events[25].synchronize()?;
            buf.check()?;
            let mut v: Vec<f64> = (5..25).map(|i| events[i].elapsed_ms(&events[i + 1]).map(|ms| ms as f64 * 1e3)).collect::<Result<_, _>>()?;
            let us = median(&mut v);
            let worst = Report::gather(g, &[us])?.map(|a| a.iter().map(|x| x[0]).fold(0.0, f64::max)).unwrap_or(us);
            let gbs = rows as f64 * 2.0 * HIDDEN as f64 / (worst * 1e-6) / 1e9;
            if worst < best.1 {
                best = (push, worst);
            }
            line.push(format!("{push}: {worst:.0} us ({gbs:.0} GB/s)"));
        }
        let (used, pushers) = buf.combine_push();
        let engine = if used == PushEngine::Bulk { format!("bulk ({pushers} threads per pushing block)") } else { "registers".into() };
        table_rows.push(vec![sms.to_string(), engine, line.join(", "), format!("{} (default {})", best.0, HtConfig::tuned_push_blocks(world, sms))]);
    }
    buf.set_combine_push_blocks(0)?;
    buf.set_combine_push(PushEngine::Tuned)?;
    if g.rank() == 0 {
        let body = format!("{n} tokens per rank; combine, slowest rank (rank 0's logical GB/s), by pushing blocks:\n\n")
            + &table(&["SMs", "push engine", "push blocks: time (logical GB/s)", "best"], &table_rows);
        rep.section(&format!("Combine push/reduce split, EP{world}"), body);
    }
    Ok(())
}
