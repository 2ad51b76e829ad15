//! GPU tests of the low-latency kernels against the CPU reference: both process modes, every
//! rank count, received rows compared as sets keyed by (source rank, token, slot), FP8 values
//! and scales bit-exact in both scale layouts, both combine modes bit-exact against the
//! reference that does the same arithmetic.

use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::{CudaStream, sys};
use half::bf16;
use moe_ep::ht::{self, HtBuffer, HtConfig};
use moe_ep::ll::{CombineArgs, CombineInput, CombineMode, DispatchArgs, Handle, LlBuffer, LlConfig, Payload, ScaleFormat, ScaleLayout};
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
    payload: Payload,
    hook: bool,
    zero_copy: bool,
    mode: CombineMode,
    layout: ScaleLayout,
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
            payload: Payload::Fp8(ScaleFormat::F32),
            hook: false,
            zero_copy: false,
            mode: CombineMode::PerExpert,
            layout: ScaleLayout::RowMajor,
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

/// Scales of packed row `j` of expert `e` as the reference lays them out (f32 bytes, or one
/// UE8M0 byte per group), read from a scale view in either layout.
fn row_scales(view: &[u8], e: usize, j: usize, groups: usize, rows: usize, ue8m0: bool, layout: ScaleLayout) -> Vec<u8> {
    let words = groups.div_ceil(4);
    (0..groups)
        .flat_map(|g| {
            let at = match (layout, ue8m0) {
                (ScaleLayout::RowMajor, false) => ((e * rows + j) * groups + g) * 4,
                (ScaleLayout::RowMajor, true) => (e * rows + j) * words * 4 + g,
                (ScaleLayout::ColumnMajor, false) => ((e * groups + g) * rows + j) * 4,
                (ScaleLayout::ColumnMajor, true) => ((e * words + g / 4) * rows + j) * 4 + g % 4,
            };
            if ue8m0 { view[at..at + 1].to_vec() } else { view[at..at + 4].to_vec() }
        })
        .collect()
}

/// Reads what `h` delivered and compares it with the reference as sets.
fn check_dispatch(g: &Group, buf: &LlBuffer, h: &Handle, w: &LlWorld, case: &Case, s: &Arc<CudaStream>) -> Result<Vec<Vec<(usize, usize, usize)>>> {
    let me = g.rank();
    let epr = case.experts / g.world();
    let rows_pe = g.world() * case.max_tokens;
    let hd = case.hidden;
    let fmt = match case.payload {
        Payload::Bf16 => None,
        Payload::Fp8(f) => Some(match f {
            ScaleFormat::F32 => moe_ep::abi::scale_fmt::F32,
            ScaleFormat::F32Pow2 => moe_ep::abi::scale_fmt::F32_POW2,
            ScaleFormat::Ue8m0 => moe_ep::abi::scale_fmt::UE8M0,
        }),
    };
    let want = w.dispatch(me, fmt);
    let counts = buf.recv_count(h)?.to_vec(s)?;
    let meta = buf.recv_src_info(h)?.to_vec(s)?;
    let (payload, row_bytes): (Vec<u8>, usize) = match case.payload {
        Payload::Bf16 => (bytemuck::cast_slice(&buf.recv_x_bf16(h)?.to_vec(s)?).to_vec(), 2 * hd),
        Payload::Fp8(_) => (buf.recv_x_fp8(h)?.to_vec(s)?, hd),
    };
    let cols = hd / 128;
    let scales: Vec<u8> = match case.payload {
        Payload::Bf16 => Vec::new(),
        Payload::Fp8(ScaleFormat::Ue8m0) => bytemuck::cast_slice(&buf.recv_scales_ue8m0(h)?.to_vec(s)?).to_vec(),
        Payload::Fp8(_) => bytemuck::cast_slice(&buf.recv_scales(h)?.to_vec(s)?).to_vec(),
    };
    let ue8m0 = case.payload == Payload::Fp8(ScaleFormat::Ue8m0);
    let scale_rows = if case.layout == ScaleLayout::ColumnMajor { buf.scale_rows() } else { rows_pe };
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
            if !scales.is_empty() {
                let got = row_scales(&scales, e, j, cols, scale_rows, ue8m0, case.layout);
                compare(&format!("expert {e} row {j} {key:?} scales"), &got, &r.scales)?;
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
        let carry_weights = case.mode == CombineMode::PreReduced || round == 1;
        let args = DispatchArgs {
            x: &x,
            topk_idx: TopkIdx::I64(&idx),
            topk_weights: carry_weights.then_some(&wts as _),
            payload: case.payload,
            scale_layout: case.layout,
            stats: Some(&stats),
            hook: case.hook,
        };
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
            CombineInput::ZeroCopy
        } else {
            CombineInput::Tensor(&y_dev)
        };
        let out = poisoned(s, n * hd, bf16::from_bits(0xFFFF))?;
        let home_weights = (case.mode == CombineMode::PerExpert).then_some(&wts as _);
        let cargs = CombineArgs { x: input, topk_idx: TopkIdx::I64(&idx), topk_weights: home_weights, out: &out, mode: case.mode, hook: case.hook };
        let (pending, _) = buf.combine(s, &h, &cargs)?;
        if let Some(p) = pending {
            buf.combine_recv(s, p)?;
        }
        buf.check()?;
        let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(s)?).to_vec();
        let idx_h = &w.topk_idx[me];
        let y_of = |t: usize, j: usize| expert_row(&w.x[me][t * hd..(t + 1) * hd], idx_h[t * k + j] as usize);
        let want = match case.mode {
            CombineMode::PerExpert => w.combine(me, &y_of),
            CombineMode::PreReduced => w.combine_pre_reduced(me, &y_of),
        };
        compare(&format!("round {round}: combined rows ({:?})", case.mode), &got, &want)?;
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
            Case { payload: Payload::Fp8(ScaleFormat::F32Pow2), ..Case::base(7168, 8, 256, 128) },
            Case { payload: Payload::Fp8(ScaleFormat::Ue8m0), ..Case::base(7168, 8, 256, 128) },
            Case { payload: Payload::Bf16, ..Case::base(7168, 8, 256, 128) },
            // DeepGEMM's column-major, TMA-aligned scales, f32 and UE8M0.
            Case { layout: ScaleLayout::ColumnMajor, ..Case::base(7168, 8, 256, 128) },
            Case { layout: ScaleLayout::ColumnMajor, payload: Payload::Fp8(ScaleFormat::Ue8m0), ..Case::base(7168, 8, 256, 125) },
        ],
    )
}

fn gpu2_ll_pre_reduced() -> Result<()> {
    let pre = CombineMode::PreReduced;
    cases(
        "gpu2_ll_pre_reduced",
        vec![
            Case { mode: pre, ..Case::base(7168, 8, 256, 128) },
            Case { mode: pre, payload: Payload::Bf16, drop: 0.3, ..Case::base(2048, 8, 64, 96) },
            Case { mode: pre, zero_rank: true, ..Case::base(2048, 8, 64, 96) },
            Case { mode: pre, routing: Routing::SameExperts(5), ..Case::base(2048, 4, 64, 64) },
            Case { mode: pre, routing: Routing::OneRank(0), ..Case::base(1024, 6, 32, 100) },
            Case { mode: pre, hook: true, layout: ScaleLayout::ColumnMajor, ..Case::base(4096, 8, 64, 64) },
            Case { mode: pre, zero_copy: true, payload: Payload::Fp8(ScaleFormat::Ue8m0), ..Case::base(640, 16, 128, 48) },
            Case { mode: pre, hook: true, zero_copy: true, ..Case::base(16384, 2, 32, 16) },
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
            Case { payload: Payload::Fp8(ScaleFormat::Ue8m0), ..Case::base(640, 16, 128, 48) },
            Case::base(16384, 2, 32, 16),
            Case { hook: true, ..Case::base(4096, 8, 64, 64) },
            Case { zero_copy: true, ..Case::base(4096, 8, 64, 64) },
            Case { hook: true, zero_copy: true, payload: Payload::Bf16, ..Case::base(2048, 8, 64, 64) },
        ],
    )
}

/// What `me` gets from combining its own tokens when every expert returns the received row
/// unchanged (identity experts), in `mode`.
#[allow(clippy::too_many_arguments)]
fn identity_combine(e: usize, hd: usize, k: usize, world: usize, me: usize, x: &[u16], idx: &[i64], w: &[f32], mode: CombineMode) -> Vec<u16> {
    let mut lw = LlWorld { num_experts: e, hidden: hd, k, x: vec![vec![]; world], topk_idx: vec![vec![]; world], topk_weights: vec![vec![]; world] };
    lw.x[me] = x.to_vec();
    lw.topk_idx[me] = idx.to_vec();
    lw.topk_weights[me] = w.to_vec();
    let y = |t: usize, _| x[t * hd..(t + 1) * hd].to_vec();
    match mode {
        CombineMode::PerExpert => lw.combine(me, &y),
        CombineMode::PreReduced => lw.combine_pre_reduced(me, &y),
    }
}

/// One graph holds a BF16 dispatch and a combine whose input is the received rows themselves
/// (identity experts), in each combine mode. Replayed 1000 times with new tokens, routing and
/// weights uploaded before each replay.
fn gpu2_ll_graph_replay_1000() -> Result<()> {
    run_both_modes("gpu2_ll_graph_replay_1000", |g, seed| {
        let (hd, k, t) = (1024, 8, 64);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let mut buf = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
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
        for mode in [CombineMode::PerExpert, CombineMode::PreReduced] {
            let run = |buf: &mut LlBuffer| -> moe_ep::Result<()> {
                let args = DispatchArgs { topk_weights: Some(&wts), payload: Payload::Bf16, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) };
                let (h, _) = buf.dispatch(&s, &args)?;
                let y = buf.recv_x_bf16(&h)?;
                let home_w = (mode == CombineMode::PerExpert).then_some(&wts as _);
                let cargs =
                    CombineArgs { x: CombineInput::Tensor(&y), topk_idx: TopkIdx::I64(&idx), topk_weights: home_w, out: &out, mode, hook: false };
                buf.combine(&s, &h, &cargs)?;
                Ok(())
            };
            // Warm-up outside the capture (module load, first-touch).
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
                    compare(&format!("{mode:?} replay {it}: combined rows"), &got, &identity_combine(e, hd, k, world, me, &xn, &in_, &wn, mode))?;
                }
            }
            g.check()?;
        }
        Ok(())
    })
}

/// The reuse race: a peer's dispatch `n + 2` must not overwrite the half that this rank's
/// dispatch `n` still needs. Every rank dispatches twice, starts a pre-reduced combine of the
/// first dispatch in hook mode (its send reads the routing and weights peers wrote into the
/// half), then dispatches a third time with new weights; rank 1 waits 300 ms before its
/// combine's send, so without the guard rank 0's third dispatch lands in rank 1's half first
/// and the first combine's results are wrong.
fn gpu2_ll_reuse_three_dispatches() -> Result<()> {
    run_both_modes("gpu2_ll_reuse_three_dispatches", |g, seed| {
        let (hd, k, t) = (2048, 8, 64);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let s = g.stream().clone();
        let mut buf = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let inputs: Vec<_> = (0..3u64)
            .map(|i| {
                let mut rng = Rng::new(seed ^ (i + 1).wrapping_mul(0x51ed) ^ me as u64);
                let (idx, w) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
                (gen_bf16(&mut rng, t * hd, 1.0), idx, w)
            })
            .collect();
        let dev: Vec<_> = inputs
            .iter()
            .map(|(x, i, w)| Ok((upload(&s, bytemuck::cast_slice::<u16, bf16>(x))?, upload(&s, i)?, upload(&s, w)?)))
            .collect::<Result<_>>()?;
        let args = |i: usize| DispatchArgs {
            topk_weights: Some(&dev[i].2),
            payload: Payload::Bf16,
            ..DispatchArgs::fp8(&dev[i].0, TopkIdx::I64(&dev[i].1))
        };
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let (h0, _) = buf.dispatch(&s, &args(0))?;
        let y0 = upload(&s, &buf.recv_x_bf16(&h0)?.to_vec(&s)?)?;
        let (_h1, _) = buf.dispatch(&s, &args(1))?;
        s.synchronize()?;
        if me == 1 {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let cargs = CombineArgs {
            x: CombineInput::Tensor(&y0),
            topk_idx: TopkIdx::I64(&dev[0].1),
            topk_weights: None,
            out: &out,
            mode: CombineMode::PreReduced,
            hook: true,
        };
        let (pending, _) = buf.combine(&s, &h0, &cargs)?;
        let (h2, _) = buf.dispatch(&s, &args(2))?;
        buf.combine_recv(&s, pending.context("hook mode returns the receive half")?)?;
        buf.check()?;
        let (x0, i0, w0) = &inputs[0];
        let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(&s)?).to_vec();
        compare("combine of the first dispatch", &got, &identity_combine(e, hd, k, world, me, x0, i0, w0, CombineMode::PreReduced))?;
        // The third dispatch delivered its own rows.
        let (x2, i2, w2) = &inputs[2];
        let y2 = upload(&s, &buf.recv_x_bf16(&h2)?.to_vec(&s)?)?;
        let out2 = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let c2 = CombineArgs { x: CombineInput::Tensor(&y2), topk_idx: TopkIdx::I64(&dev[2].1), out: &out2, hook: false, ..cargs };
        buf.combine(&s, &h2, &c2)?;
        buf.check()?;
        let got: Vec<u16> = bytemuck::cast_slice(&out2.to_vec(&s)?).to_vec();
        compare("combine of the third dispatch", &got, &identity_combine(e, hd, k, world, me, x2, i2, w2, CombineMode::PreReduced))?;
        Ok(())
    })
}

/// Misuse is refused with a typed error before anything is launched: a handle or a pending
/// combine of another buffer, a configuration or grid that differs across ranks.
fn gpu2_ll_misuse_is_refused() -> Result<()> {
    run_both_modes("gpu2_ll_misuse_is_refused", |g, seed| {
        let (hd, k, t) = (512, 4, 32);
        let world = g.world();
        let e = experts_for(world, 64);
        let s = g.stream().clone();
        let mut a = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let mut b = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let mut rng = Rng::new(seed ^ g.rank() as u64);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x = upload(&s, bytemuck::cast_slice::<u16, bf16>(&gen_bf16(&mut rng, t * hd, 1.0)))?;
        let idx = upload(&s, &idx_h)?;
        let wts = upload(&s, &w_h)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let (h, _) =
            a.dispatch(&s, &DispatchArgs { topk_weights: Some(&wts), payload: Payload::Bf16, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) })?;
        expect_refused(b.recv_count(&h), "ForeignHandle", "a view through another buffer")?;
        let y = a.recv_x_bf16(&h)?;
        let cargs = CombineArgs {
            x: CombineInput::Tensor(&y),
            topk_idx: TopkIdx::I64(&idx),
            topk_weights: None,
            out: &out,
            mode: CombineMode::PreReduced,
            hook: true,
        };
        expect_refused(b.combine(&s, &h, &cargs), "ForeignHandle", "a combine through another buffer")?;
        let (pending, _) = a.combine(&s, &h, &cargs)?;
        let pending = pending.context("hook mode returns the receive half")?;
        // The other buffer refuses the pending half (it is consumed either way); the owner then
        // finishes a fresh combine.
        expect_refused(b.combine_recv(&s, pending), "ForeignHandle", "a pending combine of another buffer")?;
        a.check()?;
        // Grids and configurations that differ across ranks.
        match b.set_launch(16 + g.rank() as u32, 512) {
            Err(moe_ep::Error::CollectiveMismatch { .. }) => {}
            other => bail!("set_launch with different grids: expected CollectiveMismatch, got {:?}", other.err()),
        }
        match LlBuffer::new(g, LlConfig::new(e, hd, k, t + g.rank())) {
            Err(moe_ep::Error::CollectiveMismatch { .. }) => Ok(()),
            Err(e) => bail!("mismatched configurations: expected CollectiveMismatch, got {e}"),
            Ok(_) => bail!("mismatched configurations were accepted"),
        }
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
        let want_ll = identity_combine(e, hd, k, world, me, &x_h, &idx_h, &w_h, CombineMode::PerExpert);
        for it in 0..1000 {
            let (h, _) = ll.dispatch(&s, &DispatchArgs { payload: Payload::Bf16, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) })?;
            let y = ll.recv_x_bf16(&h)?;
            ll.combine(
                &s,
                &h,
                &CombineArgs {
                    x: CombineInput::Tensor(&y),
                    topk_idx: TopkIdx::I64(&idx),
                    topk_weights: Some(&wts),
                    out: &out,
                    mode: CombineMode::PerExpert,
                    hook: false,
                },
            )?;
            let (hh, _) = ht.dispatch(&s, &layout, &ht::DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
            let yh = ht.recv_x_bf16(&hh)?;
            ht.combine(&s, &hh, &ht::CombineArgs { x: &yh, topk_weights: None, bias: [None, None], out: &out_ht, out_weights: None })?;
            if it % 250 == 0 || it == 999 {
                g.check()?;
                let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(&s)?).to_vec();
                compare(&format!("iteration {it}: low-latency combine"), &got, &want_ll)?;
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
        ("gpu2_ll_pre_reduced", gpu2_ll_pre_reduced),
        ("gpu2_ll_shapes_hook_zero_copy", gpu2_ll_shapes_hook_zero_copy),
        ("gpu2_ll_graph_replay_1000", gpu2_ll_graph_replay_1000),
        ("gpu2_ll_reuse_three_dispatches", gpu2_ll_reuse_three_dispatches),
        ("gpu2_ll_misuse_is_refused", gpu2_ll_misuse_is_refused),
        ("gpu2_ll_alternating_with_ht_1000", gpu2_ll_alternating_with_ht_1000),
    ])
}
