//! A prefill step with expert GEMM placeholders: high-throughput BF16 dispatch of
//! 4096 tokens per rank, an "expert" per received row that scales the token by each of this
//! rank's experts it picked (`y = sum over its local slots of w * (1 + e % 7 / 8) * x`, on the
//! CPU, standing in for the grouped GEMMs), then combine; every rank checks its tokens against
//! the CPU.
//!
//! Run on a machine with 2 or more NVLink-connected GPUs: `cargo run --release --example prefill`

mod common;

use common::{Tokens, same, tokens};
use half::bf16;
use moe_ep::ht::{CombineArgs, DispatchArgs, HtBuffer, HtConfig};
use moe_ep::{Group, GroupConfig, TopkIdx};

const HIDDEN: usize = 2048;
const TOPK: usize = 8;
const TOKENS: usize = 4096;

/// The placeholder expert's factor for global expert `e`.
fn factor(e: usize) -> f32 {
    1.0 + (e % 7) as f32 / 8.0
}

/// One expert rank's output row for a token: bf16 of `sum w_j * factor(e_j) * x` over the
/// token's slots on that rank, in slot order (fused multiply-adds from 0).
fn expert_row(x: &[bf16], slots: &[(usize, f32)]) -> Vec<bf16> {
    x.iter().map(|v| bf16::from_f32(slots.iter().fold(0f32, |a, &(e, w)| (w * factor(e)).mul_add(v.to_f32(), a)))).collect()
}

fn step(g: &Group) -> moe_ep::Result<Result<String, String>> {
    let (world, me) = (g.world(), g.rank());
    let experts = 256usize.div_ceil(world) * world;
    let epr = experts / world;
    let s = g.stream().clone();
    let cuda = |e: cudarc::driver::DriverError| moe_ep::Error::Internal { reason: e.to_string() };
    let Tokens { x, idx, w } = tokens(me as u64 + 7, TOKENS, HIDDEN, TOPK, experts);
    let xd = s.clone_htod(&x).map_err(cuda)?;
    let idxd = s.clone_htod(&idx).map_err(cuda)?;
    let wd = s.clone_htod(&w).map_err(cuda)?;
    let out = s.alloc_zeros::<bf16>(TOKENS * HIDDEN).map_err(cuda)?;
    let mut buf = HtBuffer::new(g, HtConfig::new(experts, HIDDEN, TOPK, TOKENS, world))?;
    let layout = buf.layout(&s, TopkIdx::I64(&idxd), TOPK)?;
    let (h, _) = buf.dispatch(&s, &layout, &DispatchArgs::bf16(&xd, TopkIdx::I64(&idxd), &wd))?;
    let rows = h.num_recv().unwrap_or(0);

    // The expert GEMM placeholder, on the received rows with their local expert ids and weights.
    let rx = buf.recv_x_bf16(&h)?.to_vec(&s)?;
    let ri = buf.recv_topk_idx(&h)?.to_vec(&s)?;
    let rw = buf.recv_topk_weights(&h)?.to_vec(&s)?;
    let mut y = Vec::with_capacity(rows * HIDDEN);
    for r in 0..rows {
        let slots: Vec<(usize, f32)> =
            (0..TOPK).filter(|&j| ri[r * TOPK + j] >= 0).map(|j| (me * epr + ri[r * TOPK + j] as usize, rw[r * TOPK + j])).collect();
        y.extend(expert_row(&rx[r * HIDDEN..(r + 1) * HIDDEN], &slots));
    }
    let yd = s.clone_htod(&y).map_err(cuda)?;
    buf.combine(&s, &h, &CombineArgs { x: &yd, topk_weights: None, bias: [None, None], out: &out, out_weights: None })?;
    buf.check()?;
    let got = s.clone_dtoh(&out).map_err(cuda)?;

    // What comes home: for each rank holding the token, in rank order, that rank's expert row,
    // added in f32 and rounded once.
    let mut want = Vec::with_capacity(TOKENS * HIDDEN);
    for t in 0..TOKENS {
        let mut acc = vec![0f32; HIDDEN];
        for r in 0..world {
            let slots: Vec<(usize, f32)> = (0..TOPK)
                .filter(|&j| idx[t * TOPK + j] >= 0 && idx[t * TOPK + j] as usize / epr == r)
                .map(|j| (idx[t * TOPK + j] as usize, w[t * TOPK + j]))
                .collect();
            if !slots.is_empty() {
                for (a, v) in acc.iter_mut().zip(expert_row(&x[t * HIDDEN..(t + 1) * HIDDEN], &slots)) {
                    *a += v.to_f32();
                }
            }
        }
        want.extend(acc.into_iter().map(bf16::from_f32));
    }
    Ok(same("combined tokens", &got, &want).map(|()| {
        format!(
            "rank {me} of {world} ({}): {TOKENS} tokens, {rows} rows through the expert placeholder, all {} combined values match the CPU",
            g.device_name(),
            got.len()
        )
    }))
}

fn main() {
    common::report(Group::run_threads(common::gpus_or_exit(), GroupConfig::default(), step))
}
