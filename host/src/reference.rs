//! The CPU reference (rayon) of layout, dispatch and combine, and the random input generators
//! the tests and the benchmark share. Every GPU result is compared against these, whole.
//!
//! The reference sees every rank's inputs (a [`HtWorld`] or [`LlWorld`]), which each rank of a
//! test regenerates from a shared seed, and computes one rank's expected outputs.

use crate::abi::{FP8_GROUP, scale_fmt};
use moe_ep_kernels::fp::{bf16_to_f32, f32_to_bf16, f32_to_e4m3, fp8_scale};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------
// Random inputs
// ---------------------------------------------------------------------------------------

/// A small deterministic generator (SplitMix64), so every rank can regenerate every rank's
/// inputs from one seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// How tokens pick experts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// DeepEP's benchmark: scores `|randn| + 1`, top-k by score.
    Scores,
    /// Every token picks experts of one rank only.
    OneRank(usize),
    /// Every token picks the same `k` experts starting at this one.
    SameExperts(usize),
}

/// Router output for `n` tokens: `topk_idx[n, k]` (i64) and weights, with a fraction
/// `drop` of the slots set to -1.
pub fn gen_routing(rng: &mut Rng, n: usize, k: usize, num_experts: usize, world: usize, routing: Routing, drop: f32) -> (Vec<i64>, Vec<f32>) {
    let mut idx = vec![-1i64; n * k];
    let mut w = vec![0f32; n * k];
    let epr = num_experts / world;
    let mut scores = vec![0f32; num_experts];
    let mut order: Vec<usize> = (0..num_experts).collect();
    for t in 0..n {
        match routing {
            Routing::Scores => {
                for s in scores.iter_mut() {
                    *s = rng.normal().abs() + 1.0;
                }
                order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                for j in 0..k.min(num_experts) {
                    idx[t * k + j] = order[j] as i64;
                }
            }
            Routing::OneRank(r) => {
                // k distinct experts of rank r; where it holds fewer than k, every one of them
                // and no expert (-1) in the other slots (a router never repeats an expert).
                let start = rng.below(epr);
                for j in 0..k.min(epr) {
                    idx[t * k + j] = (r * epr + (start + j) % epr) as i64;
                }
            }
            Routing::SameExperts(e0) => {
                for j in 0..k.min(num_experts) {
                    idx[t * k + j] = ((e0 + j) % num_experts) as i64;
                }
            }
        }
        for j in 0..k {
            w[t * k + j] = rng.uniform() + 0.05;
            if drop > 0.0 && rng.uniform() < drop {
                idx[t * k + j] = -1;
            }
        }
    }
    (idx, w)
}

/// `n` random bf16 values (bits), normal with the given spread.
pub fn gen_bf16(rng: &mut Rng, n: usize, scale: f32) -> Vec<u16> {
    (0..n).map(|_| f32_to_bf16(rng.normal() * scale)).collect()
}

/// Random FP8 rows with per-128-channel scales, as a caller would pass to dispatch.
pub fn gen_fp8(rng: &mut Rng, n: usize, hidden: usize) -> (Vec<u8>, Vec<f32>) {
    let x = gen_bf16(rng, n * hidden, 2.0);
    let mut q = vec![0u8; n * hidden];
    let mut s = vec![0f32; n * hidden / FP8_GROUP];
    for t in 0..n {
        let (qr, sr) = quantize_row(&x[t * hidden..(t + 1) * hidden], scale_fmt::F32);
        q[t * hidden..(t + 1) * hidden].copy_from_slice(&qr);
        for (g, sc) in sr.iter().enumerate() {
            s[t * hidden / FP8_GROUP + g] = sc.scale;
        }
    }
    (q, s)
}

/// Casts one bf16 row to FP8 e4m3 with one scale per 128 channels, exactly as the
/// low-latency kernel does.
pub fn quantize_row(x: &[u16], fmt: u32) -> (Vec<u8>, Vec<moe_ep_kernels::fp::Fp8Scale>) {
    let mut q = vec![0u8; x.len()];
    let mut scales = Vec::with_capacity(x.len() / FP8_GROUP);
    for (g, chunk) in x.chunks(FP8_GROUP).enumerate() {
        let amax = chunk.iter().map(|&b| bf16_to_f32(b).abs()).fold(0f32, f32::max);
        let sc = fp8_scale(amax, fmt);
        for (i, &b) in chunk.iter().enumerate() {
            q[g * FP8_GROUP + i] = f32_to_e4m3(bf16_to_f32(b) * sc.inv);
        }
        scales.push(sc);
    }
    (q, scales)
}

// ---------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------

/// What the layout computes for one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefLayout {
    /// `[N, R]`, 1 when the token goes to the rank.
    pub is_token_in_rank: Vec<u8>,
    /// `[N, R]`, position among this rank's tokens for that rank, or -1.
    pub token_pos: Vec<i32>,
    /// `[R]`.
    pub tokens_per_rank: Vec<i32>,
    /// `[E]`, (token, slot) pairs per expert.
    pub tokens_per_expert: Vec<i32>,
}

/// Layout of one rank's routing (`topk_idx[N, k]`).
pub fn layout(topk_idx: &[i64], k: usize, num_experts: usize, world: usize) -> RefLayout {
    let n = topk_idx.len() / k;
    let epr = (num_experts / world) as i64;
    let mut l = RefLayout {
        is_token_in_rank: vec![0; n * world],
        token_pos: vec![-1; n * world],
        tokens_per_rank: vec![0; world],
        tokens_per_expert: vec![0; num_experts],
    };
    for t in 0..n {
        for &e in &topk_idx[t * k..(t + 1) * k] {
            if e >= 0 && (e as usize) < num_experts {
                l.is_token_in_rank[t * world + (e / epr) as usize] = 1;
                l.tokens_per_expert[e as usize] += 1;
            }
        }
        for r in 0..world {
            if l.is_token_in_rank[t * world + r] == 1 {
                l.token_pos[t * world + r] = l.tokens_per_rank[r];
                l.tokens_per_rank[r] += 1;
            }
        }
    }
    l
}

// ---------------------------------------------------------------------------------------
// High-throughput dispatch and combine
// ---------------------------------------------------------------------------------------

/// One rank's high-throughput inputs.
#[derive(Clone, Debug)]
pub struct HtRank {
    /// `[N, row_bytes]` payload (BF16 bytes or FP8 bytes).
    pub x: Vec<u8>,
    /// `[N, H / 128]` FP8 scales (FP8 payloads only).
    pub scales: Option<Vec<f32>>,
    /// `[N, K]` global expert ids, -1 = none.
    pub topk_idx: Vec<i64>,
    /// `[N, K]` router weights.
    pub topk_weights: Vec<f32>,
}

impl HtRank {
    /// Tokens of this rank for `k` slots per token.
    pub fn num_tokens(&self, k: usize) -> usize {
        self.topk_idx.len() / k
    }
}

/// Every rank's high-throughput inputs.
#[derive(Clone, Debug)]
pub struct HtWorld {
    /// Experts in the model.
    pub num_experts: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Top-k slots per token.
    pub k: usize,
    /// Bytes per row: `2 * hidden` (BF16) or `hidden` (FP8).
    pub row_bytes: usize,
    /// Each rank's inputs.
    pub ranks: Vec<HtRank>,
}

/// What one rank receives from a high-throughput dispatch.
#[derive(Clone, Debug, PartialEq)]
pub struct HtRecv {
    /// Rows received.
    pub num_recv: usize,
    /// `[N_recv, row_bytes]` payload.
    pub x: Vec<u8>,
    /// `[N_recv, H / 128]` FP8 scales (FP8 payloads).
    pub scales: Vec<f32>,
    /// `[N_recv, K]` local expert ids (-1 for other ranks' experts).
    pub topk_idx: Vec<i32>,
    /// `[N_recv, K]` weights (0 where the id is -1).
    pub topk_weights: Vec<f32>,
    /// `[N_recv]` source token of each row.
    pub src_idx: Vec<i32>,
    /// Source rank of each row (not a kernel output; for building combine inputs).
    pub src_rank: Vec<usize>,
    /// Rows per local expert (aligned).
    pub expert_counts: Vec<i32>,
}

impl HtWorld {
    /// Ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// The layout of `rank`'s routing.
    pub fn layout(&self, rank: usize) -> RefLayout {
        layout(&self.ranks[rank].topk_idx, self.k, self.num_experts, self.world())
    }

    /// What `receiver` gets: rows ordered by (source rank, source token).
    pub fn dispatch(&self, receiver: usize, expert_alignment: usize) -> HtRecv {
        let (world, k) = (self.world(), self.k);
        let epr = self.num_experts / world;
        let cols = self.hidden / FP8_GROUP;
        let mut out = HtRecv {
            num_recv: 0,
            x: Vec::new(),
            scales: Vec::new(),
            topk_idx: Vec::new(),
            topk_weights: Vec::new(),
            src_idx: Vec::new(),
            src_rank: Vec::new(),
            expert_counts: vec![0; epr],
        };
        for (s, rk) in self.ranks.iter().enumerate() {
            let l = self.layout(s);
            for j in 0..epr {
                out.expert_counts[j] += l.tokens_per_expert[receiver * epr + j];
            }
            for t in 0..rk.num_tokens(k) {
                if l.is_token_in_rank[t * world + receiver] == 0 {
                    continue;
                }
                out.num_recv += 1;
                out.x.extend_from_slice(&rk.x[t * self.row_bytes..(t + 1) * self.row_bytes]);
                if let Some(sc) = &rk.scales {
                    out.scales.extend_from_slice(&sc[t * cols..(t + 1) * cols]);
                }
                for j in 0..k {
                    let e = rk.topk_idx[t * k + j];
                    let local = if e >= 0 && (e as usize) / epr == receiver { e as i32 - (receiver * epr) as i32 } else { -1 };
                    out.topk_idx.push(local);
                    out.topk_weights.push(if local >= 0 { rk.topk_weights[t * k + j] } else { 0.0 });
                }
                out.src_idx.push(t as i32);
                out.src_rank.push(s);
            }
        }
        if expert_alignment > 1 {
            for c in out.expert_counts.iter_mut() {
                *c = (*c as usize).div_ceil(expert_alignment) as i32 * expert_alignment as i32;
            }
        }
        out
    }

    /// Combine on `home`: for each token, the rows that the ranks receiving it send back
    /// (`y(r)` is rank `r`'s combine input `[N_recv(r), H]` in its dispatch order), summed in
    /// rank order in f32, plus `bias0` then `bias1`, rounded to bf16. Also the summed weights
    /// (`yw(r)`: rank `r`'s `[N_recv(r), K]` weights), in the same order.
    pub fn combine<'a>(
        &self,
        home: usize,
        y: &(dyn Fn(usize) -> &'a [u16] + Sync),
        yw: Option<&(dyn Fn(usize) -> &'a [f32] + Sync)>,
        bias0: Option<&[u16]>,
        bias1: Option<&[u16]>,
    ) -> (Vec<u16>, Vec<f32>) {
        let (world, k, h) = (self.world(), self.k, self.hidden);
        let n = self.ranks[home].num_tokens(k);
        let l = self.layout(home);
        // Row of (home, t) on rank r: rows of sources before `home`, then its position.
        let base: Vec<usize> = (0..world).map(|r| (0..home).map(|s| self.layout(s).tokens_per_rank[r] as usize).sum()).collect();
        let mut out = vec![0u16; n * h];
        let mut out_w = vec![0f32; n * k];
        out.par_chunks_mut(h.max(1)).zip(out_w.par_chunks_mut(k)).enumerate().for_each(|(t, (o, ow))| {
            let mut acc = vec![0f32; h];
            let mut accw = vec![0f32; k];
            for (r, &b) in base.iter().enumerate() {
                if l.is_token_in_rank[t * world + r] == 0 {
                    continue;
                }
                let row = b + l.token_pos[t * world + r] as usize;
                let yr = &y(r)[row * h..(row + 1) * h];
                for (a, &v) in acc.iter_mut().zip(yr) {
                    *a += bf16_to_f32(v);
                }
                if let Some(yw) = yw {
                    for (a, &v) in accw.iter_mut().zip(&yw(r)[row * k..(row + 1) * k]) {
                        *a += v;
                    }
                }
            }
            for b in [bias0, bias1].into_iter().flatten() {
                for (a, &v) in acc.iter_mut().zip(&b[t * h..(t + 1) * h]) {
                    *a += bf16_to_f32(v);
                }
            }
            for (dst, a) in o.iter_mut().zip(&acc) {
                *dst = f32_to_bf16(*a);
            }
            ow.copy_from_slice(&accw);
        });
        (out, out_w)
    }
}

// ---------------------------------------------------------------------------------------
// Low-latency dispatch and combine
// ---------------------------------------------------------------------------------------

/// Every rank's low-latency inputs (BF16 tokens and routing).
#[derive(Clone, Debug)]
pub struct LlWorld {
    /// Experts in the model.
    pub num_experts: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Top-k slots per token.
    pub k: usize,
    /// Per rank: `x[N, H]` bf16 bits, `topk_idx[N, K]`, `topk_weights[N, K]`.
    pub x: Vec<Vec<u16>>,
    /// Per rank: `[N, K]` global expert ids.
    pub topk_idx: Vec<Vec<i64>>,
    /// Per rank: `[N, K]` router weights.
    pub topk_weights: Vec<Vec<f32>>,
}

/// One row a low-latency receiver gets for a local expert.
#[derive(Clone, Debug, PartialEq)]
pub struct LlRow {
    /// Rank that sent the token.
    pub src_rank: usize,
    /// Token index on that rank.
    pub src_token: usize,
    /// Top-k slot of the token.
    pub slot: usize,
    /// BF16 bytes, or FP8 bytes.
    pub payload: Vec<u8>,
    /// f32 scales (bits), or UE8M0 bytes; empty for BF16.
    pub scales: Vec<u8>,
}

impl LlWorld {
    /// Ranks.
    pub fn world(&self) -> usize {
        self.x.len()
    }

    /// Rows `receiver` gets per local expert (any order on the GPU; here by source rank,
    /// token, slot). `fp8` is a [`scale_fmt`] value or `None` for BF16.
    pub fn dispatch(&self, receiver: usize, fp8: Option<u32>) -> Vec<Vec<LlRow>> {
        let (world, k, h) = (self.world(), self.k, self.hidden);
        let epr = self.num_experts / world;
        let mut out: Vec<Vec<LlRow>> = vec![Vec::new(); epr];
        for s in 0..world {
            let n = self.topk_idx[s].len() / k;
            let rows: Vec<(usize, usize, usize, usize)> = (0..n)
                .flat_map(|t| (0..k).map(move |j| (t, j)))
                .filter_map(|(t, j)| {
                    let e = self.topk_idx[s][t * k + j];
                    (e >= 0 && (e as usize) / epr == receiver).then(|| (e as usize - receiver * epr, t, j, 0))
                })
                .collect();
            let built: Vec<(usize, LlRow)> = rows
                .par_iter()
                .map(|&(le, t, j, _)| {
                    let x = &self.x[s][t * h..(t + 1) * h];
                    let (payload, scales) = match fp8 {
                        None => (bytemuck::cast_slice(x).to_vec(), Vec::new()),
                        Some(fmt) => {
                            let (q, sc) = quantize_row(x, fmt);
                            let scales = if fmt == scale_fmt::UE8M0 {
                                sc.iter().map(|s| s.ue8m0).collect()
                            } else {
                                sc.iter().flat_map(|s| s.scale.to_le_bytes()).collect()
                            };
                            (q, scales)
                        }
                    };
                    (le, LlRow { src_rank: s, src_token: t, slot: j, payload, scales })
                })
                .collect();
            for (le, row) in built {
                out[le].push(row);
            }
        }
        out
    }

    /// Combine on `home`: `sum_k w_k * y(t, k)` in f32 with fused multiply-adds in slot order,
    /// rounded to bf16, where `y(t, k)` is the row the expert of slot `k` returns.
    pub fn combine(&self, home: usize, y: &(dyn Fn(usize, usize) -> Vec<u16> + Sync)) -> Vec<u16> {
        let (k, h) = (self.k, self.hidden);
        let idx = &self.topk_idx[home];
        let w = &self.topk_weights[home];
        let n = idx.len() / k;
        let mut out = vec![0u16; n * h];
        out.par_chunks_mut(h.max(1)).enumerate().for_each(|(t, o)| {
            let mut acc = vec![0f32; h];
            for j in 0..k {
                let e = idx[t * k + j];
                if e < 0 || e as usize >= self.num_experts {
                    continue;
                }
                let row = y(t, j);
                for (a, &v) in acc.iter_mut().zip(&row) {
                    *a = w[t * k + j].mul_add(bf16_to_f32(v), *a);
                }
            }
            for (d, a) in o.iter_mut().zip(&acc) {
                *d = f32_to_bf16(*a);
            }
        });
        out
    }

    /// Pre-reduced combine on `home`: each expert rank `r` holding token `t` computes
    /// `p_r = bf16(sum over its slots k, in order, of w_k * y(t, k))` (f32, fused multiply-adds
    /// from 0); the home adds the `p_r` in rank order in f32 (from 0) and rounds to bf16.
    pub fn combine_pre_reduced(&self, home: usize, y: &(dyn Fn(usize, usize) -> Vec<u16> + Sync)) -> Vec<u16> {
        let (k, h, world) = (self.k, self.hidden, self.world());
        let epr = self.num_experts / world;
        let idx = &self.topk_idx[home];
        let w = &self.topk_weights[home];
        let n = idx.len() / k;
        let mut out = vec![0u16; n * h];
        out.par_chunks_mut(h.max(1)).enumerate().for_each(|(t, o)| {
            let mut acc = vec![0f32; h];
            for r in 0..world {
                let mut part: Option<Vec<f32>> = None;
                for j in 0..k {
                    let e = idx[t * k + j];
                    if e < 0 || e as usize >= self.num_experts || e as usize / epr != r {
                        continue;
                    }
                    let row = y(t, j);
                    let p = part.get_or_insert_with(|| vec![0f32; h]);
                    for (a, &v) in p.iter_mut().zip(&row) {
                        *a = w[t * k + j].mul_add(bf16_to_f32(v), *a);
                    }
                }
                if let Some(p) = part {
                    for (a, &v) in acc.iter_mut().zip(&p) {
                        *a += bf16_to_f32(f32_to_bf16(v));
                    }
                }
            }
            for (d, a) in o.iter_mut().zip(&acc) {
                *d = f32_to_bf16(*a);
            }
        });
        out
    }
}
