//! High-throughput test cases: a scenario every rank rebuilds from a seed, run on the GPU and
//! compared whole with the CPU reference (the GPU tests and the soak share them).

use crate::*;
use anyhow::{Context, Result, ensure};
use half::bf16;
use moe_ep::Group;
use moe_ep::TopkIdx;
use moe_ep::ht::{CombineArgs, DispatchArgs, HtBuffer, HtConfig, Payload, PushEngine};
use moe_ep::reference::{HtRank, HtWorld, Rng, Routing, gen_bf16, gen_fp8, gen_routing};

/// One test scenario (all ranks build the same one from the seed).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub hidden: usize,
    pub k: usize,
    pub experts: usize,
    pub tokens: usize,
    pub routing: Routing,
    pub drop: f32,
    /// A rank that has no tokens at all.
    pub empty_rank: Option<usize>,
    pub fp8: bool,
    pub alignment: usize,
    pub i32_idx: bool,
    /// How combine pushes rows home.
    pub push: PushEngine,
}

impl Case {
    pub fn base(hidden: usize, k: usize, experts: usize, tokens: usize) -> Self {
        Case {
            hidden,
            k,
            experts,
            tokens,
            routing: Routing::Scores,
            drop: 0.0,
            empty_rank: None,
            fp8: false,
            alignment: 1,
            i32_idx: false,
            push: PushEngine::Tuned,
        }
    }

    pub fn world(&self, world: usize, seed: u64) -> HtWorld {
        let experts = if self.experts == 0 { world } else { experts_for(world, self.experts) };
        let ranks = (0..world)
            .map(|r| {
                let mut rng = Rng::new(seed ^ (r as u64 + 1).wrapping_mul(0x1234_5678_9abc));
                // Uneven token counts per rank.
                let n = if self.empty_rank == Some(r) { 0 } else { self.tokens - rng.below(self.tokens / 4 + 1) };
                let routing = match self.routing {
                    Routing::OneRank(x) => Routing::OneRank(x % world),
                    other => other,
                };
                let (topk_idx, topk_weights) = gen_routing(&mut rng, n, self.k, experts, world, routing, self.drop);
                let (x, scales) = if self.fp8 {
                    let (q, s) = gen_fp8(&mut rng, n, self.hidden);
                    (q, Some(s))
                } else {
                    (bytemuck::cast_slice(&gen_bf16(&mut rng, n * self.hidden, 1.0)).to_vec(), None)
                };
                HtRank { x, scales, topk_idx, topk_weights }
            })
            .collect();
        HtWorld { num_experts: experts, hidden: self.hidden, k: self.k, row_bytes: if self.fp8 { self.hidden } else { 2 * self.hidden }, ranks }
    }
}

/// Expert outputs rank `r` returns in combine: random bf16 rows, one per received row.
pub fn combine_input(seed: u64, r: usize, rows: usize, hidden: usize) -> Vec<u16> {
    gen_bf16(&mut Rng::new(seed ^ 0xc0ffee ^ r as u64), rows * hidden, 1.0)
}

/// Runs `case` on a new buffer sized for it.
pub fn run_case(g: &Group, seed: u64, case: Case) -> Result<()> {
    let experts = if case.experts == 0 { g.world() } else { experts_for(g.world(), case.experts) };
    let cfg =
        HtConfig { combine_push: case.push, ..HtConfig::new(experts, case.hidden, case.k, case.tokens.max(1), g.world()).fit_sms(g.sm_count()) };
    let mut buf = HtBuffer::new(g, cfg)?;
    run_case_on(g, &mut buf, seed, case)
}

/// Runs `case` on `buf` (built for the case's experts, hidden size and top-k, and at least its
/// tokens): layout, dispatch, combine and cached dispatch, every output poisoned first and
/// compared whole with the reference.
pub fn run_case_on(g: &Group, buf: &mut HtBuffer, seed: u64, case: Case) -> Result<()> {
    let world = g.world();
    let me = g.rank();
    let w = case.world(world, seed);
    let (h, k) = (case.hidden, case.k);
    let n = w.ranks[me].num_tokens(k);
    let s = g.stream();
    let mine = &w.ranks[me];

    // Inputs.
    let idx64 = upload(s, &mine.topk_idx)?;
    let idx32 = upload(s, &mine.topk_idx.iter().map(|&e| e as i32).collect::<Vec<_>>())?;
    let topk = if case.i32_idx { TopkIdx::I32(&idx32) } else { TopkIdx::I64(&idx64) };
    let weights = upload(s, &mine.topk_weights)?;
    let x_bf16 = upload(s, &bytes_to_bf16(if case.fp8 { &[] } else { &mine.x }))?;
    let x_fp8 = upload(s, if case.fp8 { &mine.x[..] } else { &[] })?;
    let scales = upload(s, mine.scales.as_deref().unwrap_or(&[]))?;
    let payload = if case.fp8 { Payload::Fp8 { x: &x_fp8, scales: &scales } } else { Payload::Bf16(&x_bf16) };

    // Layout.
    let layout = buf.layout(s, topk, k)?;
    let rl = w.layout(me);
    compare("is_token_in_rank", &to_host(s, layout.is_token_in_rank())?[..n * world], &rl.is_token_in_rank)?;
    compare("token_pos", &to_host(s, layout.token_pos())?[..n * world], &rl.token_pos)?;
    compare("tokens_per_rank", &to_host(s, layout.tokens_per_rank())?, &rl.tokens_per_rank)?;
    compare("tokens_per_expert", &to_host(s, layout.tokens_per_expert())?, &rl.tokens_per_expert)?;

    // Dispatch, receive buffer poisoned first.
    buf.poison(s, 0xEE)?;
    let args =
        DispatchArgs { x: payload, topk_idx: Some(topk), topk_weights: Some(&weights), expert_alignment: case.alignment, wait_for_counts: true };
    let (handle, _ev) = buf.dispatch(s, &layout, &args)?;
    buf.check()?;
    let want = w.dispatch(me, case.alignment);
    check_recv(buf, &handle, s, &want, &case).context("full dispatch")?;

    // Combine: out poisoned, compared bit for bit with the rank-ordered f32 sum.
    let rows = want.num_recv;
    let y = upload(s, bytemuck::cast_slice::<u16, bf16>(&combine_input(seed, me, rows, h)))?;
    let recv_w = buf.recv_topk_weights(&handle)?;
    let out = poisoned(s, n * h, bf16::from_bits(0xFFFF))?;
    let out_w = poisoned(s, n * k, f32::NAN)?;
    let bias = upload(s, bytemuck::cast_slice::<u16, bf16>(&gen_bf16(&mut Rng::new(seed ^ 0xb1a5 ^ me as u64), n * h, 0.5)))?;
    let with_bias = seed.is_multiple_of(2);
    let cargs =
        CombineArgs { x: &y, topk_weights: Some(&recv_w), bias: [with_bias.then_some(&bias as _), None], out: &out, out_weights: Some(&out_w) };
    buf.combine(s, &handle, &cargs)?;
    buf.check()?;
    let ys: Vec<Vec<u16>> = (0..world).map(|r| combine_input(seed, r, w.dispatch(r, 1).num_recv, h)).collect();
    let yws: Vec<Vec<f32>> = (0..world).map(|r| w.dispatch(r, 1).topk_weights).collect();
    let bias_host: Vec<u16> = bytemuck::cast_slice::<bf16, u16>(&bias.to_vec(s)?).to_vec();
    let (want_out, want_w) = w.combine(me, &|r| &ys[r][..], Some(&|r| &yws[r][..]), with_bias.then_some(&bias_host[..]), None);
    compare("combined x", bytemuck::cast_slice::<bf16, u16>(&out.to_vec(s)?), &want_out)?;
    compare(
        "combined weights",
        &out_w.to_vec(s)?.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        &want_w.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
    )?;

    // Cached dispatch of the same routing (no count exchange) lands the same rows.
    let mut handle = handle;
    buf.poison(s, 0x11)?;
    buf.cached_dispatch(s, &mut handle, &args)?;
    buf.check()?;
    check_recv(buf, &handle, s, &want, &case).context("cached dispatch")?;
    Ok(())
}

fn check_recv(
    buf: &HtBuffer,
    h: &moe_ep::ht::Handle,
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    want: &moe_ep::reference::HtRecv,
    case: &Case,
) -> Result<()> {
    ensure!(h.num_recv() == Some(want.num_recv), "num_recv {:?}, expected {}", h.num_recv(), want.num_recv);
    let counts: Vec<i32> = h.expert_counts().unwrap().iter().map(|&c| c as i32).collect();
    compare("per-expert counts", &counts, &want.expert_counts)?;
    compare("per-expert counts (device)", &to_host(s, h.expert_counts_device())?, &want.expert_counts)?;
    if case.fp8 {
        compare("recv_x (fp8)", &buf.recv_x_fp8(h)?.to_vec(s)?, &want.x)?;
        let got: Vec<u32> = buf.recv_scales(h)?.to_vec(s)?.iter().map(|v| v.to_bits()).collect();
        compare("recv scales", &got, &want.scales.iter().map(|v| v.to_bits()).collect::<Vec<_>>())?;
    } else {
        let got = buf.recv_x_bf16(h)?.to_vec(s)?;
        compare("recv_x (bf16)", bytemuck::cast_slice::<bf16, u8>(&got), &want.x)?;
    }
    compare("recv_topk_idx", &buf.recv_topk_idx(h)?.to_vec(s)?, &want.topk_idx)?;
    let got: Vec<u32> = buf.recv_topk_weights(h)?.to_vec(s)?.iter().map(|v| v.to_bits()).collect();
    compare("recv_topk_weights", &got, &want.topk_weights.iter().map(|v| v.to_bits()).collect::<Vec<_>>())?;
    compare("recv_src_idx", &buf.recv_src_idx(h)?.to_vec(s)?, &want.src_idx)?;
    Ok(())
}
