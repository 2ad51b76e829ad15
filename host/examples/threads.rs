//! One process driving every GPU of the machine, one thread per GPU: a high-throughput
//! dispatch and combine (prefill shape), with every expert returning its rows unchanged, checked
//! on every rank against the CPU.
//!
//! Run on a machine with 2 or more NVLink-connected GPUs: `cargo run --release --example threads`

mod common;

use common::{Tokens, ranks_of, same, tokens};
use half::bf16;
use moe_ep::ht::{CombineArgs, DispatchArgs, HtBuffer, HtConfig};
use moe_ep::{Group, GroupConfig, TopkIdx};

const HIDDEN: usize = 7168;
const TOPK: usize = 8;
const TOKENS: usize = 1024;

fn step(g: &Group) -> moe_ep::Result<Result<String, String>> {
    let (world, me) = (g.world(), g.rank());
    let experts = 256usize.div_ceil(world) * world;
    let s = g.stream().clone();
    let Tokens { x, idx, w } = tokens(me as u64 + 1, TOKENS, HIDDEN, TOPK, experts);
    let err = |what: &'static str| move |e: cudarc::driver::DriverError| moe_ep::Error::InvalidArgument { name: what, reason: e.to_string() };
    let xd = s.clone_htod(&x).map_err(err("x"))?;
    let idxd = s.clone_htod(&idx).map_err(err("topk_idx"))?;
    let wd = s.clone_htod(&w).map_err(err("topk_weights"))?;
    let out = s.alloc_zeros::<bf16>(TOKENS * HIDDEN).map_err(err("out"))?;

    let mut buf = HtBuffer::new(g, HtConfig::new(experts, HIDDEN, TOPK, TOKENS, world))?;
    let layout = buf.layout(&s, TopkIdx::I64(&idxd), TOPK)?;
    let (h, _) = buf.dispatch(&s, &layout, &DispatchArgs::bf16(&xd, TopkIdx::I64(&idxd), &wd))?;
    let received = h.num_recv().unwrap_or(0);
    // Identity experts: the combine input is the received rows themselves.
    let y = buf.recv_x_bf16(&h)?;
    buf.combine(&s, &h, &CombineArgs { x: &y, topk_weights: None, bias: [None, None], out: &out, out_weights: None })?;
    buf.check()?;
    let got = s.clone_dtoh(&out).map_err(err("out"))?;

    // Each token comes back once from every rank that holds one of its experts; the home adds
    // those rows in rank order in f32 and rounds once.
    let epr = experts / world;
    let mut want = vec![bf16::ZERO; TOKENS * HIDDEN];
    for t in 0..TOKENS {
        let copies = ranks_of(&idx, t, TOPK, epr).count_ones();
        for c in 0..HIDDEN {
            let v = x[t * HIDDEN + c].to_f32();
            let mut acc = 0f32;
            for _ in 0..copies {
                acc += v;
            }
            want[t * HIDDEN + c] = bf16::from_f32(acc);
        }
    }
    Ok(same("combined tokens", &got, &want).map(|()| {
        format!(
            "rank {me} of {world} ({}): {TOKENS} tokens dispatched, {received} rows received, all {} combined values match the CPU",
            g.device_name(),
            got.len()
        )
    }))
}

fn main() {
    common::report(Group::run_threads(common::gpus_or_exit(), GroupConfig::default(), step))
}
