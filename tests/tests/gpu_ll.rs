//! GPU tests of the low-latency kernels against the CPU reference: both process modes, every
//! rank count, received rows compared as sets keyed by (source rank, token, slot), FP8 values
//! and scales bit-exact in both scale layouts, both combine modes bit-exact against the
//! reference that does the same arithmetic.

use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::sys;
use half::bf16;
use moe_ep::ht::{self, HtBuffer, HtConfig};
use moe_ep::ll::{CombineArgs, CombineInput, CombineMode, DispatchArgs, LlBuffer, LlConfig, Payload, ScaleFormat, ScaleLayout};
use moe_ep::reference::{LlWorld, Rng, Routing, gen_bf16, gen_routing};
use moe_ep::{DeviceArg, TopkIdx};
use moe_ep_kernels::fp::{bf16_to_f32, f32_to_bf16};
use moe_ep_tests::ll_case::{Case, run_case};
use moe_ep_tests::*;

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

/// A per-expert combine of `y` (in the buffer's receive order) into `out`, not in hook mode.
fn per_expert<'a>(y: &'a dyn DeviceArg<bf16>, idx: &'a DevBuf<i64>, wts: &'a DevBuf<f32>, out: &'a DevBuf<bf16>) -> CombineArgs<'a> {
    CombineArgs { x: CombineInput::Tensor(y), topk_idx: TopkIdx::I64(idx), topk_weights: Some(wts), out, mode: CombineMode::PerExpert, hook: false }
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

/// One rank's BF16 tokens, routing (by scores, none dropped) and weights: on the host for the
/// reference, and uploaded.
struct Inputs {
    x_h: Vec<u16>,
    idx_h: Vec<i64>,
    w_h: Vec<f32>,
    x: DevBuf<bf16>,
    idx: DevBuf<i64>,
    wts: DevBuf<f32>,
}

impl Inputs {
    fn new(s: &std::sync::Arc<cudarc::driver::CudaStream>, seed: u64, world: usize, (e, hd, k, t): (usize, usize, usize, usize)) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x_h = gen_bf16(&mut rng, t * hd, 1.0);
        let x = upload(s, bytemuck::cast_slice::<u16, bf16>(&x_h))?;
        let idx = upload(s, &idx_h)?;
        let wts = upload(s, &w_h)?;
        Ok(Inputs { x_h, idx_h, w_h, x, idx, wts })
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
        buf.combine_recv(&s, &mut pending.context("hook mode returns the receive half")?)?;
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
        let mut pending = pending.context("hook mode returns the receive half")?;
        // Two combines may be pending (one per half, two micro-batches in flight); a third would
        // reuse the first one's half.
        let (second, _) = a.combine(&s, &h, &cargs)?;
        let mut second = second.context("hook mode returns the receive half")?;
        expect_refused(a.combine(&s, &h, &cargs), "PendingHook", "a third combine while two receive halves are pending")?;
        // The other buffer refuses the pending half and leaves it whole: the owner then runs it,
        // once.
        expect_refused(b.combine_recv(&s, &mut pending), "ForeignHandle", "a pending combine of another buffer")?;
        a.combine_recv(&s, &mut pending)?;
        expect_refused(a.combine_recv(&s, &mut pending), "StaleHandle", "a receive half run twice")?;
        a.combine_recv(&s, &mut second)?;
        a.check()?;
        let zero_copy = CombineArgs {
            x: CombineInput::ZeroCopy,
            topk_idx: TopkIdx::I64(&idx),
            topk_weights: None,
            out: &out,
            mode: CombineMode::PreReduced,
            hook: false,
        };
        // Poisoning overwrites every half's rows and metadata: earlier handles are stale.
        a.poison(&s, 0xEE)?;
        expect_refused(a.recv_count(&h), "StaleHandle", "a view of a dispatch from before poison")?;
        expect_refused(a.combine(&s, &h, &zero_copy), "StaleHandle", "a combine with a handle from before poison")?;
        // A hook-mode dispatch: views may be taken before its receive half (their contents are
        // valid once the stream has run it); a combine may not start before it.
        let hook_args = DispatchArgs { topk_weights: Some(&wts), payload: Payload::Bf16, hook: true, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) };
        let (mut hh, _) = a.dispatch(&s, &hook_args)?;
        a.recv_count(&hh)?;
        a.recv_src_info(&hh)?;
        a.recv_x_bf16(&hh)?;
        expect_refused(a.combine(&s, &hh, &zero_copy), "PendingHook", "a combine before the dispatch's receive half")?;
        // A second hook-mode dispatch goes to the other half (two micro-batches in flight); a
        // third would reuse the first one's half.
        let (mut hh2, _) = a.dispatch(&s, &hook_args)?;
        expect_refused(a.dispatch(&s, &hook_args), "PendingHook", "a third dispatch while two receive halves are pending")?;
        a.dispatch_recv(&s, &mut hh, None)?;
        a.dispatch_recv(&s, &mut hh2, None)?;
        a.combine(&s, &hh, &zero_copy)?;
        a.check()?;
        // Grids and configurations that differ across ranks.
        match b.set_launch(skewed_grid(g), 512) {
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
        let mut ht = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let Inputs { x_h, idx_h, w_h, x, idx, wts } = Inputs::new(&s, seed ^ me as u64, world, (e, hd, k, t))?;
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

/// Inputs that live on another stream and are dropped right after the call: the dispatch
/// runs behind a long queue of barriers on the group's stream, the inputs are freed on their
/// own stream and that memory is reused at once for junk. The library orders the inputs'
/// stream after the launch, so the dispatch still reads the real inputs (without that
/// ordering the junk would land first and the rows would differ).
fn gpu2_ll_inputs_freed_early_on_their_stream() -> Result<()> {
    run_both_modes("gpu2_ll_inputs_freed_early_on_their_stream", |g, seed| {
        let world = g.world();
        let case = Case { payload: Payload::Bf16, ..Case::base(2048, 8, experts_for(world, 64), 64) };
        let w = case.world(world, seed);
        let me = g.rank();
        let s = g.stream().clone();
        let s2 = g.context().new_stream()?;
        let mut buf = LlBuffer::new(g, LlConfig::new(case.experts, case.hidden, case.k, case.max_tokens))?;
        let x_host: Vec<bf16> = bytemuck::cast_slice::<u16, bf16>(&w.x[me]).to_vec();
        let x = s2.clone_htod(&x_host)?;
        let idx = s2.clone_htod(&w.topk_idx[me])?;
        // About 10,000 barriers ahead of the dispatch on the group's stream.
        g.launch_barrier(&s, 10_000)?;
        let (h, _) = buf.dispatch(&s, &DispatchArgs { payload: Payload::Bf16, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) })?;
        drop(x);
        drop(idx);
        let junk_x = s2.clone_htod(&vec![bf16::from_bits(0x4f4f); x_host.len()])?;
        let junk_idx = s2.clone_htod(&vec![0i64; w.topk_idx[me].len()])?;
        buf.check()?;
        moe_ep_tests::ll_case::check_dispatch(g, &buf, &h, &w, &case, &s).context("dispatch of inputs freed early")?;
        drop((junk_x, junk_idx));
        Ok(())
    })
}

/// The trace the benchmark's breakdown reads: with tracing on, a dispatch and a combine (both
/// checked against the reference) stamp every mark of every block, in order within a block;
/// a trace taken with no launch since is all zero.
fn gpu2_ll_trace_marks() -> Result<()> {
    run_both_modes("gpu2_ll_trace_marks", |g, seed| {
        let world = g.world();
        let case = Case { mode: CombineMode::PreReduced, ..Case::base(2048, 8, experts_for(world, 64), 64) };
        let mut buf = LlBuffer::new(g, LlConfig::new(case.experts, case.hidden, case.k, case.max_tokens))?;
        buf.enable_trace()?;
        moe_ep_tests::ll_case::run_case_on(g, &mut buf, seed, case)?;
        let t = buf.take_trace(g.stream())?;
        use moe_ep::abi::trace;
        for (kernel, rows) in [("dispatch", &t.dispatch), ("combine", &t.combine)] {
            anyhow::ensure!(rows.len() == buf.config().num_blocks as usize, "{kernel}: {} trace rows", rows.len());
            for (b, r) in rows.iter().enumerate() {
                let m = [r[trace::START], r[trace::SENT], r[trace::SIGNALLED], r[trace::ARRIVED], r[trace::DONE], r[trace::END]];
                anyhow::ensure!(m.iter().all(|&v| v != 0) && m.windows(2).all(|p| p[0] <= p[1]), "{kernel} block {b}: marks {m:?}");
            }
        }
        let empty = buf.take_trace(g.stream())?;
        anyhow::ensure!(empty.dispatch.iter().chain(&empty.combine).all(|r| r.iter().all(|&v| v == 0)), "a cleared trace holds stamps");
        Ok(())
    })
}

/// Corrupt indices in the receive buffers are reported, never followed: after every rank's
/// dispatch, each rank overwrites its received rows and their metadata (keeping the handle, as
/// memory overwritten under the buffer would), then combines per expert. Every source rank read
/// from the metadata is then out of range; the kernels must report `BadIndex` (here, or passed
/// on by a peer) instead of writing through it into another rank's memory.
fn gpu2_ll_corrupt_indices_are_reported() -> Result<()> {
    run_both_modes("gpu2_ll_corrupt_indices_are_reported", |g, seed| {
        let (hd, k, t) = (512, 4, 32);
        let world = g.world();
        let e = experts_for(world, 64);
        let s = g.stream().clone();
        let mut a = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let mut rng = Rng::new(seed ^ g.rank() as u64);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x = upload(&s, bytemuck::cast_slice::<u16, bf16>(&gen_bf16(&mut rng, t * hd, 1.0)))?;
        let idx = upload(&s, &idx_h)?;
        let wts = upload(&s, &w_h)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let (h, _) = a.dispatch(&s, &DispatchArgs { payload: Payload::Bf16, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) })?;
        let y = upload(&s, &a.recv_x_bf16(&h)?.to_vec(&s)?)?;
        g.barrier()?;
        a.corrupt_received_for_testing(&s, 0xEE)?;
        g.barrier()?;
        let args = per_expert(&y, &idx, &wts, &out);
        expect_bad_index(a.combine(&s, &h, &args).and_then(|_| a.check()), "a combine over corrupt receive metadata")?;
        println!("rank {}: the corrupt metadata was reported: {:?}", g.rank(), g.failure());
        Ok(())
    })
}

/// Hooks dropped without being called do not wedge the buffer: two hook-mode dispatches whose
/// handles are dropped, then two hook-mode combines whose pending receives are not run, leave
/// the buffer refusing the next call (`PendingHook`: it would reuse a pending half) until
/// `recover_pending_hooks` finishes them (the dispatches received, the combines drained); a
/// kept pending combine is then refused, and the next dispatch and combine are exact.
fn gpu2_ll_abandoned_hooks_recover() -> Result<()> {
    run_both_modes("gpu2_ll_abandoned_hooks_recover", |g, seed| {
        let (hd, k, t) = (1024, 4, 32);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let s = g.stream().clone();
        let mut buf = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let Inputs { x_h, idx_h, w_h, x, idx, wts } = Inputs::new(&s, seed ^ me as u64, world, (e, hd, k, t))?;
        let args = |hook| DispatchArgs { topk_weights: Some(&wts), payload: Payload::Bf16, hook, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) };
        // Two hook-mode dispatches whose handles are dropped at once, their receive halves never
        // run: a third dispatch would reuse the first one's half.
        let _ = buf.dispatch(&s, &args(true))?;
        let _ = buf.dispatch(&s, &args(true))?;
        expect_refused(buf.dispatch(&s, &args(false)), "PendingHook", "a dispatch after two dropped dispatch hooks")?;
        anyhow::ensure!(buf.recover_pending_hooks(&s)? == (true, false), "recovery did not find the pending dispatches");
        buf.check().context("after recovering the dispatches")?;
        let (h, _) = buf.dispatch(&s, &args(false))?;
        let y = upload(&s, &buf.recv_x_bf16(&h)?.to_vec(&s)?)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let cargs = |hook| CombineArgs {
            x: CombineInput::Tensor(&y),
            topk_idx: TopkIdx::I64(&idx),
            topk_weights: Some(&wts),
            out: &out,
            mode: CombineMode::PerExpert,
            hook,
        };
        let (pending, _) = buf.combine(&s, &h, &cargs(true))?;
        let mut kept = pending.context("hook mode returns the receive half")?;
        let (dropped, _) = buf.combine(&s, &h, &cargs(true))?;
        drop(dropped);
        buf.check().context("after the two combines' send halves")?;
        expect_refused(buf.combine(&s, &h, &cargs(false)), "PendingHook", "a combine after two unfinished combine hooks")?;
        anyhow::ensure!(buf.recover_pending_hooks(&s)? == (false, true), "recovery did not find the pending combines");
        buf.check().context("after draining the combines")?;
        expect_refused(buf.combine_recv(&s, &mut kept), "StaleHandle", "a receive half that recovery drained")?;
        drop(kept);
        buf.combine(&s, &h, &cargs(false))?;
        buf.check()?;
        let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(&s)?).to_vec();
        compare("combine after recovering both hooks", &got, &identity_combine(e, hd, k, world, me, &x_h, &idx_h, &w_h, CombineMode::PerExpert))?;
        Ok(())
    })
}

/// A buffer's calls on different streams run in call order: a hook-mode dispatch and its
/// receive half go on stream `a`, held for 500 ms by a host function first, and the combine of
/// the received rows on stream `b`. The combine must wait for `a`: run at once, it would send
/// rows that have not arrived yet.
fn gpu2_ll_calls_on_two_streams_keep_order() -> Result<()> {
    extern "C" fn hold_500ms(_: *mut std::ffi::c_void) {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    run_both_modes("gpu2_ll_calls_on_two_streams_keep_order", |g, seed| {
        let (hd, k, t) = (1024, 4, 32);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let s = g.stream().clone();
        let (a, b) = (g.context().new_stream()?, g.context().new_stream()?);
        let mut buf = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        let Inputs { x_h, idx_h, w_h, x, idx, wts } = Inputs::new(&s, seed ^ me as u64, world, (e, hd, k, t))?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        buf.poison(&s, 0xEE)?;
        buf.check()?;
        let t0 = std::time::Instant::now();
        // SAFETY: a host function that only sleeps (it makes no CUDA call), with no data.
        unsafe { sys::cuLaunchHostFunc(a.cu_stream(), Some(hold_500ms), std::ptr::null_mut()) }.result()?;
        let args = DispatchArgs { topk_weights: Some(&wts), payload: Payload::Bf16, hook: true, ..DispatchArgs::fp8(&x, TopkIdx::I64(&idx)) };
        let (mut h, _) = buf.dispatch(&a, &args)?;
        buf.dispatch_recv(&a, &mut h, None)?;
        // Identity experts: the combine's input is the received rows themselves.
        let y = buf.recv_x_bf16(&h)?;
        let cargs = per_expert(&y, &idx, &wts, &out);
        buf.combine(&b, &h, &cargs)?;
        buf.check()?;
        let held = t0.elapsed();
        ensure!(held >= std::time::Duration::from_millis(400), "stream a was held only {held:?}: the test tested nothing");
        let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(&s)?).to_vec();
        compare(
            "a combine on another stream than its dispatch",
            &got,
            &identity_combine(e, hd, k, world, me, &x_h, &idx_h, &w_h, CombineMode::PerExpert),
        )?;
        // Poisoning is refused while a receive half is pending (a poisoned pending dispatch
        // could never be received or recovered).
        let (mut h2, _) = buf.dispatch(&b, &args)?;
        expect_refused(buf.poison(&s, 0xEE), "PendingHook", "poison while a dispatch's receive half is pending")?;
        buf.dispatch_recv(&s, &mut h2, None)?;
        buf.check()?;
        Ok(())
    })
}

/// An input from another GPU's CUDA context is refused before anything is launched, with an
/// error naming the argument: rank 0 (one thread per GPU) passes tokens allocated on GPU 1.
/// Needs two GPUs in one process.
fn gpu2x_foreign_context_is_refused() -> Result<()> {
    let name = "gpu2x_foreign_context_is_refused";
    report_line("ranks", name, "[2]");
    run_threads(2, |g| {
        let (hd, k, t) = (512, 4, 16);
        let e = experts_for(2, 64);
        let mut buf = LlBuffer::new(g, LlConfig::new(e, hd, k, t))?;
        if g.rank() == 0 {
            let other = cudarc::driver::CudaContext::new(1)?.new_stream()?;
            let x = other.alloc_zeros::<bf16>(t * hd)?;
            let idx = g.stream().alloc_zeros::<i64>(t * k)?;
            match buf.dispatch(g.stream(), &DispatchArgs::fp8(&x, TopkIdx::I64(&idx))) {
                Err(moe_ep::Error::InvalidArgument { name: "x", reason }) => println!("rank 0: refused: {reason}"),
                Err(e) => anyhow::bail!("tokens of another GPU: expected InvalidArgument naming x, got {e}"),
                Ok(_) => anyhow::bail!("tokens of another GPU were accepted"),
            }
        }
        g.barrier()?;
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    gpu_main(&[
        ("gpu2x_foreign_context_is_refused", gpu2x_foreign_context_is_refused),
        ("gpu2_ll_abandoned_hooks_recover", gpu2_ll_abandoned_hooks_recover),
        ("gpu2_ll_calls_on_two_streams_keep_order", gpu2_ll_calls_on_two_streams_keep_order),
        ("gpu2_ll_corrupt_indices_are_reported", gpu2_ll_corrupt_indices_are_reported),
        ("gpu2_ll_formats", gpu2_ll_formats),
        ("gpu2_ll_edges", gpu2_ll_edges),
        ("gpu2_ll_pre_reduced", gpu2_ll_pre_reduced),
        ("gpu2_ll_shapes_hook_zero_copy", gpu2_ll_shapes_hook_zero_copy),
        ("gpu2_ll_graph_replay_1000", gpu2_ll_graph_replay_1000),
        ("gpu2_ll_reuse_three_dispatches", gpu2_ll_reuse_three_dispatches),
        ("gpu2_ll_misuse_is_refused", gpu2_ll_misuse_is_refused),
        ("gpu2_ll_alternating_with_ht_1000", gpu2_ll_alternating_with_ht_1000),
        ("gpu2_ll_inputs_freed_early_on_their_stream", gpu2_ll_inputs_freed_early_on_their_stream),
        ("gpu2_ll_trace_marks", gpu2_ll_trace_marks),
    ])
}
