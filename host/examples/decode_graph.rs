//! A decode step captured in a CUDA graph: low-latency dispatch and pre-reduced combine (every
//! expert returning its rows unchanged) captured once, then replayed with new tokens, routing
//! and weights written into the same input buffers before each replay, checked against the CPU.
//!
//! Run on a machine with 2 or more NVLink-connected GPUs: `cargo run --release --example decode_graph`

mod common;

use common::{Tokens, same, tokens};
use cudarc::driver::sys;
use half::bf16;
use moe_ep::ll::{self, LlBuffer, LlConfig};
use moe_ep::{Group, GroupConfig, TopkIdx};

const HIDDEN: usize = 4096;
const TOPK: usize = 8;
const TOKENS: usize = 64;
const REPLAYS: u64 = 200;

type Outcome = Result<String, String>;

/// What the pre-reduced combine of identity experts gives for `t`: per rank holding the token
/// (in rank order), bf16 of its slots' `sum w_k * x` (fused multiply-adds in slot order), added
/// in f32 and rounded once.
fn want(tok: &Tokens, world: usize, epr: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; TOKENS * HIDDEN];
    for t in 0..TOKENS {
        let slots: Vec<(i64, f32)> = (0..TOPK).map(|j| (tok.idx[t * TOPK + j], tok.w[t * TOPK + j])).collect();
        for c in 0..HIDDEN {
            let v = tok.x[t * HIDDEN + c].to_f32();
            let acc = (0..world).fold(0f32, |acc, r| {
                let mine: Vec<f32> = slots.iter().filter(|(e, _)| *e >= 0 && *e as usize / epr == r).map(|s| s.1).collect();
                if mine.is_empty() { acc } else { acc + bf16::from_f32(mine.iter().fold(0f32, |a, &wk| wk.mul_add(v, a))).to_f32() }
            });
            out[t * HIDDEN + c] = bf16::from_f32(acc);
        }
    }
    out
}

fn step(g: &Group) -> moe_ep::Result<Outcome> {
    let (world, me) = (g.world(), g.rank());
    let experts = 64usize.div_ceil(world) * world;
    let epr = experts / world;
    let s = g.stream().clone();
    let cuda = |e: cudarc::driver::DriverError| moe_ep::Error::Internal { reason: e.to_string() };
    let first = tokens(me as u64 * 1000, TOKENS, HIDDEN, TOPK, experts);
    let mut xd = s.clone_htod(&first.x).map_err(cuda)?;
    let mut idxd = s.clone_htod(&first.idx).map_err(cuda)?;
    let mut wd = s.clone_htod(&first.w).map_err(cuda)?;
    let out = s.alloc_zeros::<bf16>(TOKENS * HIDDEN).map_err(cuda)?;
    let mut buf = LlBuffer::new(g, LlConfig::new(experts, HIDDEN, TOPK, TOKENS))?;

    let decode = |buf: &mut LlBuffer,
                  xd: &cudarc::driver::CudaSlice<bf16>,
                  idxd: &cudarc::driver::CudaSlice<i64>,
                  wd: &cudarc::driver::CudaSlice<f32>|
     -> moe_ep::Result<()> {
        let args = ll::DispatchArgs { topk_weights: Some(wd), payload: ll::Payload::Bf16, ..ll::DispatchArgs::fp8(xd, TopkIdx::I64(idxd)) };
        let (h, _) = buf.dispatch(&s, &args)?;
        let y = buf.recv_x_bf16(&h)?;
        let cargs = ll::CombineArgs {
            x: ll::CombineInput::Tensor(&y),
            topk_idx: TopkIdx::I64(idxd),
            topk_weights: None,
            out: &out,
            mode: ll::CombineMode::PreReduced,
            hook: false,
        };
        buf.combine(&s, &h, &cargs).map(|_| ())
    };
    // One run outside the capture (module load, first touch), then the capture.
    decode(&mut buf, &xd, &idxd, &wd)?;
    buf.check()?;
    s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(cuda)?;
    let captured = decode(&mut buf, &xd, &idxd, &wd);
    let graph = s.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(cuda)?;
    captured?;
    let Some(graph) = graph else { return Ok(Err("the capture produced no graph".into())) };
    let mut checked = 0;
    for it in 1..=REPLAYS {
        let tok = tokens(me as u64 * 1000 + it, TOKENS, HIDDEN, TOPK, experts);
        s.memcpy_htod(&tok.x, &mut xd).map_err(cuda)?;
        s.memcpy_htod(&tok.idx, &mut idxd).map_err(cuda)?;
        s.memcpy_htod(&tok.w, &mut wd).map_err(cuda)?;
        graph.launch().map_err(cuda)?;
        if it % 25 == 0 {
            buf.check()?;
            let got = s.clone_dtoh(&out).map_err(cuda)?;
            if let Err(e) = same(&format!("replay {it}"), &got, &want(&tok, world, epr)) {
                return Ok(Err(e));
            }
            checked += 1;
        }
    }
    buf.check()?;
    Ok(Ok(format!(
        "rank {me} of {world} ({}): {REPLAYS} graph replays of dispatch + pre-reduced combine, {checked} checked against the CPU in full",
        g.device_name()
    )))
}

fn main() {
    common::report(Group::run_threads(common::gpus_or_exit(), GroupConfig::default(), step))
}
