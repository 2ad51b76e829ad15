//! High-throughput benchmark: DeepEP's defaults, NCCL all-to-all baseline, P2P limit, sweep.

use crate::report::{Report, Series, line_chart, table};
use crate::{Opts, median};
use anyhow::{Context, Result, ensure};
use cudarc::driver::{CudaSlice, CudaStream, sys};
use half::bf16;
use moe_ep::diag::{CopyEngine, P2pProbe};
use moe_ep::ht::{CombineArgs, DispatchArgs, HtBuffer, HtConfig, Payload};
use moe_ep::reference::{HtRank, HtWorld, Rng, Routing, gen_bf16, gen_fp8, gen_routing};
use moe_ep::{Group, TopkIdx};
use std::sync::Arc;

const EXPERTS: usize = 256;
const HIDDEN: usize = 7168;
const TOPK: usize = 8;
const SEED: u64 = 20261128;

/// One rank's inputs (regenerable by every rank from the seed).
fn rank_inputs(r: usize, n: usize, world: usize) -> (HtRank, Vec<u8>, Vec<f32>) {
    let mut rng = Rng::new(SEED ^ (r as u64 + 1) ^ (n as u64) << 20);
    let (topk_idx, topk_weights) = gen_routing(&mut rng, n, TOPK, EXPERTS, world, Routing::Scores, 0.0);
    let x = bytemuck::cast_slice(&gen_bf16(&mut rng, n * HIDDEN, 1.0)).to_vec();
    let (q, s) = gen_fp8(&mut rng, n, HIDDEN);
    (HtRank { x, scales: None, topk_idx, topk_weights }, q, s)
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

fn measure(g: &Group, buf: &mut HtBuffer<'_>, n: usize, iters: usize, check: bool) -> Result<Point> {
    let world = g.world();
    let me = g.rank();
    let s = g.stream();
    let (mine, q, sc) = rank_inputs(me, n, world);
    let up = |v: &[u8]| -> Result<CudaSlice<u8>> { Ok(s.clone_htod(if v.is_empty() { &[0u8][..] } else { v })?) };
    let x = s.clone_htod(&mine.x.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect::<Vec<_>>())?;
    let idx = s.clone_htod(&mine.topk_idx)?;
    let wts = s.clone_htod(&mine.topk_weights)?;
    let xq = up(&q)?;
    let xs = s.clone_htod(&sc)?;
    let y = s.clone_htod(&gen_bf16(&mut Rng::new(7), world * n * HIDDEN, 1.0).iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
    let out = s.alloc_zeros::<bf16>(n * HIDDEN)?;
    let topk = TopkIdx::I64(&idx);
    let layout = buf.layout(s, topk, TOPK)?;
    let bf16_args =
        DispatchArgs { x: Payload::Bf16(&x), topk_idx: Some(topk), topk_weights: Some(&wts), expert_alignment: 1, wait_for_counts: false };
    let fp8_args = DispatchArgs { x: Payload::Fp8 { x: &xq, scales: &xs }, ..bf16_args };

    // Correctness first: one dispatch and combine against the CPU reference.
    let (mut h, _) = buf.dispatch(s, &layout, &DispatchArgs { wait_for_counts: true, ..bf16_args })?;
    let num_recv = h.num_recv().unwrap();
    let ref_layout = moe_ep::reference::layout(&mine.topk_idx, TOPK, EXPERTS, world);
    let remote_sent: usize = (0..world).filter(|&r| r != me).map(|r| ref_layout.tokens_per_rank[r] as usize).sum();
    let remote_recv = num_recv - ref_layout.tokens_per_rank[me] as usize;
    if check {
        let w = HtWorld {
            num_experts: EXPERTS,
            hidden: HIDDEN,
            k: TOPK,
            row_bytes: 2 * HIDDEN,
            ranks: (0..world).map(|r| rank_inputs(r, n, world).0).collect(),
        };
        let want = w.dispatch(me, 1);
        let got = buf.recv_x_bf16(&h)?.to_vec(s)?;
        ensure!(bytemuck::cast_slice::<bf16, u8>(&got) == &want.x[..], "rank {me}: dispatched rows differ from the reference");
        let yv = y.slice(0..num_recv * HIDDEN);
        buf.combine(s, &h, &CombineArgs { x: &yv, topk_weights: None, bias: [None, None], out: &out, out_weights: None })?;
        buf.check()?;
        let ys: Vec<Vec<u16>> =
            (0..world).map(|r| gen_bf16(&mut Rng::new(7), world * n * HIDDEN, 1.0)[..w.dispatch(r, 1).num_recv * HIDDEN].to_vec()).collect();
        let (want_out, _) = w.combine(me, &|r| &ys[r][..], None, None, None);
        let got: Vec<u16> = s.clone_dtoh(&out)?.iter().map(|v| v.to_bits()).collect();
        ensure!(got == want_out, "rank {me}: combined rows differ from the reference");
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
        let e: Vec<_> = (0..7).map(|_| ev()).collect::<Result<_, _>>()?;
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
        let f0 = ev()?;
        f0.record(s)?;
        buf.dispatch_into(s, &mut h, &fp8_args)?;
        let f1 = ev()?;
        f1.record(s)?;
        f1.synchronize()?;
        if it >= warm {
            let t = |a: usize, b: usize| -> Result<f64> { Ok(e[a].elapsed_ms(&e[b])? as f64 * 1e3) };
            samples[0].push(t(0, 1)?);
            samples[1].push(t(1, 2)?);
            samples[5].push(t(2, 3)?);
            samples[2].push(t(3, 4)?);
            samples[5].push(t(4, 5)?);
            samples[3].push(t(5, 6)?);
            samples[4].push(f0.elapsed_ms(&f1)? as f64 * 1e3);
        }
    }
    buf.check()?;
    let mut us = [0f64; 6];
    for (i, v) in samples.iter_mut().enumerate() {
        us[i] = median(v);
    }
    Ok(Point { us, num_recv, remote_sent, remote_recv })
}

/// Logical and physical GB/s of each operation.
fn rates(p: &[f64]) -> Vec<(f64, f64)> {
    // p: [us x6, num_recv, remote_sent, remote_recv]
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

/// NCCL all-to-all of the same traffic (rows deduplicated per rank, BF16): (dispatch-like us,
/// combine-like us), or why it could not run. Counts are known up front; only the data
/// movement is timed.
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
            let (rk, _, _) = rank_inputs(src, n, world);
            moe_ep::reference::layout(&rk.topk_idx, TOPK, EXPERTS, world).tokens_per_rank.iter().map(|&c| c as usize).collect()
        })
        .collect();
    let row = 2 * HIDDEN;
    let out_rows: Vec<usize> = (0..world).map(|r| counts[me][r]).collect();
    let in_rows: Vec<usize> = (0..world).map(|r| counts[r][me]).collect();
    let a = s.alloc_zeros::<u8>(out_rows.iter().sum::<usize>() * row + 1)?;
    let mut b = s.alloc_zeros::<u8>(in_rows.iter().sum::<usize>() * row + 1)?;
    let mut c = s.alloc_zeros::<u8>(out_rows.iter().sum::<usize>() * row + 1)?;
    let ctx = s.context().clone();
    // One all-to-all: send `sends[r]` rows from `src` to each r, receive `recvs[r]` into `dst`.
    let alltoall = |src: &CudaSlice<u8>, sends: &[usize], dst: &mut CudaSlice<u8>, recvs: &[usize]| -> Result<f64> {
        let e0 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let e1 = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e0.record(&s)?;
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
        e1.record(&s)?;
        e1.synchronize()?;
        Ok(e0.elapsed_ms(&e1)? as f64 * 1e3)
    };
    let (mut fwd, mut rev) = (Vec::new(), Vec::new());
    for i in 0..iters + 5 {
        let f = alltoall(&a, &out_rows, &mut b, &in_rows)?;
        let r = alltoall(&b, &in_rows, &mut c, &out_rows)?;
        if i >= 5 {
            fwd.push(f);
            rev.push(r);
        }
    }
    Ok(Ok((median(&mut fwd), median(&mut rev))))
}

pub fn run(g: &Group, o: &Opts, rep: &mut Report) -> Result<()> {
    let world = g.world();
    let sweep_tokens: Vec<usize> = if o.sweep { vec![128, 256, 512, 1024, 2048, 4096, 8192] } else { vec![] };
    let sweep_sms: Vec<u32> = if o.sweep { vec![8, 16, 24, 32] } else { vec![] };
    let max_tokens = sweep_tokens.iter().cloned().chain([o.tokens]).max().unwrap();
    let cfg = HtConfig { num_sms: o.sms, combine_push_blocks: o.push, ..HtConfig::new(EXPERTS, HIDDEN, TOPK, max_tokens, world) };
    let mut buf = HtBuffer::new(g, cfg).context("creating the high-throughput buffer")?;

    // The main point, DeepEP's defaults.
    let p = measure(g, &mut buf, o.tokens, o.iters, true)?;
    let all = Report::gather(g, &point_vals(&p))?;
    // Baselines in the same run.
    let nccl = nccl_baseline(g, o.tokens, o.iters.min(30))?;
    let nccl_all = match &nccl {
        Ok((f, r)) => Report::gather(g, &[*f, *r])?.map(Ok),
        Err(e) => {
            let _ = Report::gather(g, &[f64::NAN, f64::NAN])?;
            Some(Err(e.clone()))
        }
    };
    let probe = P2pProbe::new(g, 128 << 20)?;
    g.host_barrier()?;
    let ring24 = probe.copy_bandwidth(g, g.stream(), (g.rank() + 1) % world, o.sms, CopyEngine::Registers, 4)?;
    let ring_all = Report::gather(g, &[ring24])?;
    drop(probe);

    if let (Some(all), Some(nccl_all), Some(ring)) = (all, nccl_all, ring_all) {
        let mut rows = Vec::new();
        let mut slow = [(0f64, f64::MAX, f64::MAX); 6];
        for (r, v) in all.iter().enumerate() {
            let rt = rates(v);
            for i in 0..6 {
                rows.push(vec![
                    r.to_string(),
                    OPS[i].into(),
                    format!("{:.1}", v[i]),
                    if i == 0 { "-".into() } else { format!("{:.1}", rt[i].0) },
                    if i == 0 { "-".into() } else { format!("{:.1}", rt[i].1) },
                ]);
                slow[i].0 = slow[i].0.max(v[i]);
                slow[i].1 = slow[i].1.min(rt[i].0);
                slow[i].2 = slow[i].2.min(rt[i].1);
            }
        }
        let ring_min = ring.iter().map(|v| v[0]).fold(f64::MAX, f64::min);
        let mut body = format!(
            "{} tokens per rank, hidden {HIDDEN}, top-{TOPK} of {EXPERTS} experts, scores |randn|+1, {} SMs; threads per block launched: dispatch {}, combine {}; medians of {} runs; results checked against the CPU reference first.\n\n",
            o.tokens,
            o.sms,
            g.launch_threads(moe_ep::Kernel::HtDispatch, buf.config().threads),
            g.launch_threads(moe_ep::Kernel::HtCombine, buf.config().threads),
            o.iters
        );
        body += &table(&["rank", "operation", "us", "logical GB/s", "NVLink GB/s"], &rows);
        body += "\nSlowest rank:\n\n";
        let srows: Vec<Vec<String>> = (0..6)
            .map(|i| {
                vec![
                    OPS[i].into(),
                    format!("{:.1}", slow[i].0),
                    if i == 0 { "-".into() } else { format!("{:.1}", slow[i].1) },
                    if i == 0 { "-".into() } else { format!("{:.1}", slow[i].2) },
                ]
            })
            .collect();
        body += &table(&["operation", "us", "logical GB/s", "NVLink GB/s"], &srows);
        body += &format!(
            "\nP2P limit in the same run (every rank storing to its ring neighbour, {} SMs, registers): slowest rank {ring_min:.1} GB/s physical.\n",
            o.sms
        );
        match nccl_all {
            Ok(v) => {
                let f = v.iter().map(|x| x[0]).fold(0.0, f64::max);
                let r = v.iter().map(|x| x[1]).fold(0.0, f64::max);
                body += &format!(
                    "\nNCCL all-to-all of the same traffic (BF16 rows deduplicated per rank, data movement only, slowest rank): dispatch-like {f:.1} us, combine-like {r:.1} us; moe-ep cached dispatch BF16 {:.1} us, combine {:.1} us.\n",
                    slow[2].0, slow[5].0
                );
            }
            Err(e) => body += &format!("\nNCCL baseline not run: {e}\n"),
        }
        rep.section(&format!("High-throughput, EP{world}"), body);
    }

    // Sweep over tokens per rank and SM budget.
    if !sweep_tokens.is_empty() {
        let mut csv = vec!["sweep,tokens,sms,op,slowest_us,slowest_logical_gbs".to_string()];
        let mut series: Vec<(String, Vec<(f64, f64)>)> = [2usize, 3, 5].iter().map(|&i| (OPS[i].to_string(), Vec::new())).collect();
        let mut rows = Vec::new();
        let mut sweep = |kind: &str, n: usize, sms: u32, buf: &mut HtBuffer<'_>| -> Result<Option<Vec<f64>>> {
            buf.set_launch(sms, buf.config().threads)?;
            let p = measure(g, buf, n, o.iters, false)?;
            Ok(Report::gather(g, &point_vals(&p))?.map(|all| {
                let mut worst = [0f64; 6];
                let mut gb = vec![f64::MAX; 6];
                for v in &all {
                    let rt = rates(v);
                    for i in 1..6 {
                        worst[i] = worst[i].max(v[i]);
                        gb[i] = gb[i].min(rt[i].0);
                    }
                }
                for i in 1..6 {
                    csv.push(format!("{kind},{n},{sms},{},{:.1},{:.1}", OPS[i], worst[i], gb[i]));
                }
                gb
            }))
        };
        for &n in &sweep_tokens {
            if let Some(gb) = sweep("tokens", n, o.sms, &mut buf)? {
                for (j, &i) in [2usize, 3, 5].iter().enumerate() {
                    series[j].1.push((n as f64, gb[i]));
                }
                rows.push(vec![n.to_string(), o.sms.to_string(), format!("{:.1}", gb[2]), format!("{:.1}", gb[3]), format!("{:.1}", gb[5])]);
            }
        }
        for &sms in &sweep_sms {
            if let Some(gb) = sweep("sms", o.tokens, sms, &mut buf)? {
                rows.push(vec![o.tokens.to_string(), sms.to_string(), format!("{:.1}", gb[2]), format!("{:.1}", gb[3]), format!("{:.1}", gb[5])]);
            }
        }
        buf.set_launch(o.sms, buf.config().threads)?;
        if g.rank() == 0 {
            let body = table(&["tokens/rank", "SMs", "dispatch BF16 cached GB/s", "dispatch FP8 cached GB/s", "combine GB/s"], &rows)
                + "\n(logical GB/s of the slowest rank; full figures in sweep.csv, plot in sweep.svg)\n";
            rep.section(&format!("High-throughput sweep, EP{world}"), body);
            rep.files.push(("sweep.csv".into(), csv.join("\n") + "\n"));
            let series: Vec<Series> = series.into_iter().map(|(n, pts)| Series { points: pts, ..Series::line(&n) }).collect();
            rep.files.push((
                "sweep.svg".into(),
                line_chart(
                    &format!("moe-ep EP{world} on {} ({} SMs)", g.device_name(), o.sms),
                    "tokens per rank",
                    "logical GB/s (slowest rank)",
                    &series,
                    true,
                ),
            ));
        }
    }
    Ok(())
}
