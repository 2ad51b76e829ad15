//! GPU tests of the low-latency kernels against the CPU reference: both process modes, every
//! rank count, received rows compared as sets keyed by (source rank, token, slot), FP8 values
//! and scales bit-exact, combine within one bf16 ulp (in practice bit-exact).

use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::{CudaStream, sys};
use half::bf16;
use moe_ep::ht::{CombineArgs, DispatchArgs, HtBuffer, HtConfig};
use moe_ep::ll::{LlBuffer, LlCombineArgs, LlCombineInput, LlConfig, LlDispatchArgs, LlHandle, LlPayload, ScaleFormat};
use moe_ep::reference::{LlRow, LlWorld, Rng, Routing, gen_bf16, gen_routing};
use moe_ep::{Group, TopkIdx};
use moe_ep_kernels::fp::{bf16_to_f32, f32_to_bf16};
use moe_ep_tests::*;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone, Copy, Debug)]
struct Case {
    hidden: usize,
    k: usize,
    experts: usize,
    max_tokens: usize,
    /// Tokens per rank (rank 1 gets `zero_rank` tokens when set).
    tokens: usize,
    routing: Routing,
    drop: f32,
    zero_rank: bool,
    payload: LlPayload,
    hook: bool,
    zero_copy: bool,
}

impl Case {
    fn base(hidden: usize, k: usize, experts: usize, tokens: usize) -> Self {
        Case {
            hidden,
            k,
            experts,
            max_tokens: tokens,
            tokens,
            routing: Routing::Scores,
            drop: 0.0,
            zero_rank: false,
            payload: LlPayload::Fp8(ScaleFormat::F32),
            hook: false,
            zero_copy: false,
        }
    }

    fn world(&self, world: usize, seed: u64) -> LlWorld {
        let mut w = LlWorld { num_experts: self.experts, hidden: self.hidden, k: self.k, x: vec![], topk_idx: vec![], topk_weights: vec![] };
        for r in 0..world {
            let mut rng = Rng::new(seed ^ (r as u64 + 7).wrapping_mul(0x51_7cc1_b727_220a));
            let n = if self.zero_rank && r == 1 { 0 } else { self.tokens };
            let (idx, wt) = gen_routing(&mut rng, n, self.k, self.experts, world, self.routing, self.drop);
            w.x.push(gen_bf16(&mut rng, n * self.hidden, 1.5));
            w.topk_idx.push(idx);
            w.topk_weights.push(wt);
        }
        w
    }
}

/// Expert `e`'s output for a token: the token times a per-expert factor, in bf16.
fn expert_row(x: &[u16], e: usize) -> Vec<u16> {
    let c = 1.0 + (e % 7) as f32 / 8.0;
    x.iter().map(|&v| f32_to_bf16(bf16_to_f32(v) * c)).collect()
}

fn ulp_diff(a: u16, b: u16) -> u32 {
    let key = |v: u16| if v & 0x8000 != 0 { 0x8000 - (v & 0x7fff) as i32 } else { 0x8000 + v as i32 };
    (key(a) - key(b)).unsigned_abs()
}

/// Reads what `h` delivered and compares it with the reference as sets.
fn check_dispatch(
    g: &Group,
    buf: &LlBuffer<'_>,
    h: &LlHandle,
    w: &LlWorld,
    case: &Case,
    s: &Arc<CudaStream>,
) -> Result<Vec<Vec<(usize, usize, usize)>>> {
    let me = g.rank();
    let epr = case.experts / g.world();
    let rows_pe = g.world() * case.max_tokens;
    let hd = case.hidden;
    let fmt = match case.payload {
        LlPayload::Bf16 => None,
        LlPayload::Fp8(f) => Some(match f {
            ScaleFormat::F32 => moe_ep::abi::scale_fmt::F32,
            ScaleFormat::F32Pow2 => moe_ep::abi::scale_fmt::F32_POW2,
            ScaleFormat::Ue8m0 => moe_ep::abi::scale_fmt::UE8M0,
        }),
    };
    let want = w.dispatch(me, fmt);
    let counts = buf.recv_count(h)?.to_vec(s)?;
    let meta = buf.recv_src_info(h)?.to_vec(s)?;
    let (payload, row_bytes): (Vec<u8>, usize) = match case.payload {
        LlPayload::Bf16 => (bytemuck::cast_slice(&buf.recv_x_bf16(h)?.to_vec(s)?).to_vec(), 2 * hd),
        LlPayload::Fp8(_) => (buf.recv_x_fp8(h)?.to_vec(s)?, hd),
    };
    let cols = hd / 128;
    let (scales, scale_row): (Vec<u8>, usize) = match case.payload {
        LlPayload::Bf16 => (Vec::new(), 0),
        LlPayload::Fp8(ScaleFormat::Ue8m0) => (bytemuck::cast_slice(&buf.recv_scales_ue8m0(h)?.to_vec(s)?).to_vec(), cols.div_ceil(4) * 4),
        LlPayload::Fp8(_) => (bytemuck::cast_slice(&buf.recv_scales(h)?.to_vec(s)?).to_vec(), 4 * cols),
    };
    let scale_used = match case.payload {
        LlPayload::Fp8(ScaleFormat::Ue8m0) => cols,
        _ => 4 * cols,
    };
    let mut layout = Vec::new();
    for e in 0..epr {
        ensure!(counts[e] as usize == want[e].len(), "expert {e}: {} rows received, expected {}", counts[e], want[e].len());
        let mut expected: HashMap<(usize, usize, usize), &LlRow> = want[e].iter().map(|r| ((r.src_rank, r.src_token, r.slot), r)).collect();
        let mut rows = Vec::new();
        for j in 0..counts[e] as usize {
            let row = e * rows_pe + j;
            let m = meta[row];
            let key = ((m >> 24) as usize, (m & 0xffff) as usize, ((m >> 16) & 0xff) as usize);
            let Some(r) = expected.remove(&key) else { bail!("expert {e} row {j}: unexpected or duplicate source {key:?}") };
            compare(&format!("expert {e} row {j} {key:?} payload"), &payload[row * row_bytes..(row + 1) * row_bytes], &r.payload)?;
            if scale_row > 0 {
                compare(&format!("expert {e} row {j} {key:?} scales"), &scales[row * scale_row..row * scale_row + scale_used], &r.scales)?;
            }
            rows.push(key);
        }
        ensure!(expected.is_empty(), "expert {e}: {} rows never arrived", expected.len());
        layout.push(rows);
    }
    Ok(layout)
}

fn run_case(g: &Group, seed: u64, case: Case) -> Result<()> {
    let world = g.world();
    let case = Case { experts: experts_for(world, case.experts), ..case };
    let me = g.rank();
    let w = case.world(world, seed);
    let epr = case.experts / world;
    let (hd, k) = (case.hidden, case.k);
    let n = w.topk_idx[me].len() / k;
    let cfg = LlConfig::new(case.experts, hd, k, case.max_tokens);
    let mut buf = LlBuffer::new(g, cfg)?;
    let s = g.stream();
    let x = upload(s, bytemuck::cast_slice::<u16, bf16>(&w.x[me]))?;
    let idx = upload(s, &w.topk_idx[me])?;
    let wts = upload(s, &w.topk_weights[me])?;
    let stats = upload(s, &vec![0i32; epr])?;
    for round in 0..2 {
        // Two rounds: both buffer halves.
        buf.poison(s, 0xEE)?;
        let args = LlDispatchArgs { x: &x, topk_idx: TopkIdx::I64(&idx), payload: case.payload, stats: Some(&stats), hook: case.hook };
        let (mut h, _) = buf.dispatch(s, &args)?;
        if case.hook {
            buf.dispatch_recv(s, &mut h, Some(&stats))?;
        }
        buf.check()?;
        let rows = check_dispatch(g, &buf, &h, &w, &case, s).with_context(|| format!("dispatch round {round}"))?;
        // Expert outputs at the received rows.
        let rows_pe = world * case.max_tokens;
        let mut y = vec![0u16; epr * rows_pe * hd];
        for (e, list) in rows.iter().enumerate() {
            for (j, &(sr, t, _)) in list.iter().enumerate() {
                let row = e * rows_pe + j;
                let xr = &w.x[sr][t * hd..(t + 1) * hd];
                y[row * hd..(row + 1) * hd].copy_from_slice(&expert_row(xr, me * epr + e));
            }
        }
        let y_dev = upload(s, bytemuck::cast_slice::<u16, bf16>(&y))?;
        let input = if case.zero_copy {
            let view = buf.combine_input(&h)?;
            ensure!(view.len() == y.len());
            // SAFETY: the view spans `y.len()` bf16 of this rank's heap; the stream orders the
            // copy before the combine (this is what an expert GEMM writing there would do).
            unsafe { cudarc::driver::result::memcpy_htod_async(view.device_addr(), &y[..], s.cu_stream())? };
            s.synchronize()?;
            LlCombineInput::ZeroCopy
        } else {
            LlCombineInput::Tensor(&y_dev)
        };
        let out = poisoned(s, n * hd, bf16::from_bits(0xFFFF))?;
        let cargs = LlCombineArgs { x: input, topk_idx: TopkIdx::I64(&idx), topk_weights: &wts, out: &out, hook: case.hook };
        let (pending, _) = buf.combine(s, &h, &cargs)?;
        if let Some(p) = pending {
            buf.combine_recv(s, p)?;
        }
        buf.check()?;
        let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(s)?).to_vec();
        let idx_h = &w.topk_idx[me];
        let want = w.combine(me, &|t, j| expert_row(&w.x[me][t * hd..(t + 1) * hd], idx_h[t * k + j] as usize));
        let worst = got.iter().zip(&want).map(|(&a, &b)| ulp_diff(a, b)).max().unwrap_or(0);
        ensure!(worst <= 1, "round {round}: combine differs from the reference by up to {worst} bf16 ulps");
    }
    // Cumulative statistics: two rounds of counts.
    let counts: Vec<i32> = w.dispatch(me, None).iter().map(|v| 2 * v.len() as i32).collect();
    compare("per-expert statistics", &stats.to_vec(s)?, &counts)?;
    Ok(())
}

fn cases(name: &str, list: Vec<Case>) -> Result<()> {
    run_cases(name, &list, run_case)
}

fn gpu2_ll_formats() -> Result<()> {
    cases(
        "gpu2_ll_formats",
        vec![
            Case::base(7168, 8, 256, 128),
            Case { payload: LlPayload::Fp8(ScaleFormat::F32Pow2), ..Case::base(7168, 8, 256, 128) },
            Case { payload: LlPayload::Fp8(ScaleFormat::Ue8m0), ..Case::base(7168, 8, 256, 128) },
            Case { payload: LlPayload::Bf16, ..Case::base(7168, 8, 256, 128) },
        ],
    )
}

fn gpu2_ll_edges() -> Result<()> {
    cases(
        "gpu2_ll_edges",
        vec![
            Case { drop: 0.3, ..Case::base(2048, 8, 64, 96) },
            Case { zero_rank: true, ..Case::base(2048, 8, 64, 96) },
            Case { routing: Routing::SameExperts(5), ..Case::base(2048, 4, 64, 64) },
            // N = T, and fewer tokens than T.
            Case { max_tokens: 200, tokens: 200, ..Case::base(1024, 6, 32, 200) },
            Case { max_tokens: 256, tokens: 100, ..Case::base(1024, 6, 32, 100) },
        ],
    )
}

fn gpu2_ll_shapes_hook_zero_copy() -> Result<()> {
    cases(
        "gpu2_ll_shapes_hook_zero_copy",
        vec![
            Case::base(128, 1, 16, 32),
            Case { payload: LlPayload::Fp8(ScaleFormat::Ue8m0), ..Case::base(640, 16, 128, 48) },
            Case::base(16384, 2, 32, 16),
            Case { hook: true, ..Case::base(4096, 8, 64, 64) },
            Case { zero_copy: true, ..Case::base(4096, 8, 64, 64) },
            Case { hook: true, zero_copy: true, payload: LlPayload::Bf16, ..Case::base(2048, 8, 64, 64) },
        ],
    )
}

/// One graph holds a BF16 dispatch and a combine whose input is the received rows themselves
/// (identity experts): out = sum_k w_k * x. Replayed 1000 times with new tokens, routing and
/// weights uploaded before each replay.
fn gpu2_ll_graph_replay_1000() -> Result<()> {
    run_both_modes("gpu2_ll_graph_replay_1000", |g, seed| {
        let (hd, k, t) = (1024, 8, 64);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let buf = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let mut buf = buf;
        let s = g.stream().clone();
        let make = |it: u64| -> (Vec<u16>, Vec<i64>, Vec<f32>) {
            let mut rng = Rng::new(seed ^ it.wrapping_mul(0x9e37) ^ me as u64);
            let (idx, w) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.1);
            (gen_bf16(&mut rng, t * hd, 1.0), idx, w)
        };
        let (x0, i0, w0) = make(0);
        let mut x = upload(&s, bytemuck::cast_slice::<u16, bf16>(&x0))?;
        let mut idx = upload(&s, &i0)?;
        let mut wts = upload(&s, &w0)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        // Warm-up outside the capture (module load, first-touch).
        let run = |buf: &mut LlBuffer<'_>| -> moe_ep::Result<()> {
            let (h, _) =
                buf.dispatch(&s, &LlDispatchArgs { x: &x, topk_idx: TopkIdx::I64(&idx), payload: LlPayload::Bf16, stats: None, hook: false })?;
            let y = buf.recv_x_bf16(&h)?;
            buf.combine(
                &s,
                &h,
                &LlCombineArgs { x: LlCombineInput::Tensor(&y), topk_idx: TopkIdx::I64(&idx), topk_weights: &wts, out: &out, hook: false },
            )?;
            Ok(())
        };
        run(&mut buf)?;
        buf.check()?;
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let captured = run(&mut buf);
        let graph = s.end_capture(sys::CUgraphInstantiate_flags(0))?;
        captured?;
        let graph = graph.context("empty graph")?;
        for it in 1..=1000u64 {
            let (xn, in_, wn) = make(it);
            x.write(&s, bytemuck::cast_slice(&xn))?;
            idx.write(&s, &in_)?;
            wts.write(&s, &wn)?;
            graph.launch()?;
            if it % 100 == 0 || it <= 3 {
                g.check()?;
                let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(&s)?).to_vec();
                let w =
                    LlWorld { num_experts: e, hidden: hd, k, x: vec![xn.clone(); 1], topk_idx: vec![in_.clone()], topk_weights: vec![wn.clone()] };
                let want = w.combine(0, &|tt, _| xn[tt * hd..(tt + 1) * hd].to_vec());
                let worst = got.iter().zip(&want).map(|(&a, &b)| ulp_diff(a, b)).max().unwrap_or(0);
                ensure!(worst <= 1, "replay {it}: combine differs by {worst} ulps");
            }
        }
        g.check()?;
        Ok(())
    })
}

/// 1000 back-to-back low-latency calls, each followed by a high-throughput dispatch and
/// combine on the same GPUs; checked at intervals.
fn gpu2_ll_alternating_with_ht_1000() -> Result<()> {
    run_both_modes("gpu2_ll_alternating_with_ht_1000", |g, seed| {
        let (hd, k, t) = (512, 4, 32);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let s = g.stream().clone();
        let mut ll = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let mut ht = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world))?;
        let mut rng = Rng::new(seed ^ me as u64);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x_h = gen_bf16(&mut rng, t * hd, 1.0);
        let x = upload(&s, bytemuck::cast_slice::<u16, bf16>(&x_h))?;
        let idx = upload(&s, &idx_h)?;
        let wts = upload(&s, &w_h)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let out_ht = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let layout = ht.layout(&s, TopkIdx::I64(&idx), k)?;
        let want_ll = LlWorld { num_experts: e, hidden: hd, k, x: vec![x_h.clone()], topk_idx: vec![idx_h.clone()], topk_weights: vec![w_h.clone()] }
            .combine(0, &|tt, _| x_h[tt * hd..(tt + 1) * hd].to_vec());
        for it in 0..1000 {
            let (h, _) =
                ll.dispatch(&s, &LlDispatchArgs { x: &x, topk_idx: TopkIdx::I64(&idx), payload: LlPayload::Bf16, stats: None, hook: false })?;
            let y = ll.recv_x_bf16(&h)?;
            ll.combine(
                &s,
                &h,
                &LlCombineArgs { x: LlCombineInput::Tensor(&y), topk_idx: TopkIdx::I64(&idx), topk_weights: &wts, out: &out, hook: false },
            )?;
            let (hh, _) = ht.dispatch(&s, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
            let yh = ht.recv_x_bf16(&hh)?;
            ht.combine(&s, &hh, &CombineArgs { x: &yh, topk_weights: None, bias: [None, None], out: &out_ht, out_weights: None })?;
            if it % 250 == 0 || it == 999 {
                g.check()?;
                let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(&s)?).to_vec();
                let worst = got.iter().zip(&want_ll).map(|(&a, &b)| ulp_diff(a, b)).max().unwrap_or(0);
                ensure!(worst <= 1, "iteration {it}: low-latency combine differs by {worst} ulps");
                // High-throughput combine of the received rows: x times the number of ranks
                // the token went to, summed in rank order.
                let l = moe_ep::reference::layout(&idx_h, k, e, world);
                let got: Vec<u16> = bytemuck::cast_slice(&out_ht.to_vec(&s)?).to_vec();
                for tt in 0..t {
                    let copies = (0..world).filter(|&r| l.is_token_in_rank[tt * world + r] == 1).count();
                    for c in 0..hd {
                        let v = bf16_to_f32(x_h[tt * hd + c]);
                        let mut acc = 0f32;
                        for _ in 0..copies {
                            acc += v;
                        }
                        ensure!(got[tt * hd + c] == f32_to_bf16(acc), "iteration {it}: high-throughput combine token {tt} channel {c}");
                    }
                }
            }
        }
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    gpu_main(&[
        ("gpu2_ll_formats", gpu2_ll_formats),
        ("gpu2_ll_edges", gpu2_ll_edges),
        ("gpu2_ll_shapes_hook_zero_copy", gpu2_ll_shapes_hook_zero_copy),
        ("gpu2_ll_graph_replay_1000", gpu2_ll_graph_replay_1000),
        ("gpu2_ll_alternating_with_ht_1000", gpu2_ll_alternating_with_ht_1000),
    ])
}
