//! One process per GPU under torchrun's environment variables: a low-latency (decode) dispatch
//! and both combine modes, with every expert returning its rows unchanged, checked against the
//! CPU.
//!
//! ```sh
//! cargo build --release --example torchrun
//! export MOE_EP_SECRET=$(openssl rand -hex 16)
//! torchrun --nproc-per-node 4 --no-python target/release/examples/torchrun
//! ```
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` come from torchrun; the
//! rendezvous listens on `MASTER_PORT + 1`.)

mod common;

use common::{Tokens, same, tokens};
use half::bf16;
use moe_ep::ll::{self, LlBuffer, LlConfig};
use moe_ep::{Group, GroupConfig, TopkIdx};

const HIDDEN: usize = 7168;
const TOPK: usize = 8;
const TOKENS: usize = 128;

fn run() -> Result<String, Box<dyn std::error::Error>> {
    let g = Group::from_env(GroupConfig::default())?;
    let (world, me) = (g.world(), g.rank());
    let experts = 256usize.div_ceil(world) * world;
    let epr = experts / world;
    let s = g.stream().clone();
    let all: Vec<Tokens> = (0..world).map(|r| tokens(r as u64 + 1, TOKENS, HIDDEN, TOPK, experts)).collect();
    let Tokens { x, idx, w } = &all[me];
    let xd = s.clone_htod(x)?;
    let idxd = s.clone_htod(idx)?;
    let wd = s.clone_htod(w)?;
    let out = s.alloc_zeros::<bf16>(TOKENS * HIDDEN)?;

    let mut buf = LlBuffer::new(&g, LlConfig::new(experts, HIDDEN, TOPK, TOKENS))?;
    let args = ll::DispatchArgs { topk_weights: Some(&wd), payload: ll::Payload::Bf16, ..ll::DispatchArgs::fp8(&xd, TopkIdx::I64(&idxd)) };
    let (h, _) = buf.dispatch(&s, &args)?;
    buf.check()?;
    // Rows per local expert: every (token, slot) of every rank that picked one of this rank's
    // experts.
    let counts = buf.recv_count(&h)?.to_vec(&s)?;
    let mut want_counts = vec![0i32; epr];
    for t in &all {
        for &e in t.idx.iter().filter(|&&e| e >= 0 && e as usize / epr == me) {
            want_counts[e as usize % epr] += 1;
        }
    }
    if counts != want_counts {
        return Err(format!("rank {me}: rows per local expert {counts:?}, expected {want_counts:?}").into());
    }
    let mut checked = Vec::new();
    for mode in [ll::CombineMode::PerExpert, ll::CombineMode::PreReduced] {
        // Identity experts: the combine input is the received rows themselves.
        let y = buf.recv_x_bf16(&h)?;
        let home_w = (mode == ll::CombineMode::PerExpert).then_some(&wd as _);
        let cargs =
            ll::CombineArgs { x: ll::CombineInput::Tensor(&y), topk_idx: TopkIdx::I64(&idxd), topk_weights: home_w, out: &out, mode, hook: false };
        buf.combine(&s, &h, &cargs)?;
        buf.check()?;
        let got = s.clone_dtoh(&out)?;
        let mut want = vec![bf16::ZERO; TOKENS * HIDDEN];
        for t in 0..TOKENS {
            let slots = &idx[t * TOPK..(t + 1) * TOPK];
            for c in 0..HIDDEN {
                let v = x[t * HIDDEN + c].to_f32();
                let acc = match mode {
                    // sum_k w_k * x, fused multiply-adds in slot order.
                    ll::CombineMode::PerExpert => {
                        slots.iter().zip(&w[t * TOPK..]).filter(|(e, _)| **e >= 0).fold(0f32, |a, (_, &wk)| wk.mul_add(v, a))
                    }
                    // Per rank (in rank order): bf16 of its slots' sum, then the f32 sum of those.
                    _ => (0..world).fold(0f32, |acc, r| {
                        let mine: Vec<f32> =
                            slots.iter().zip(&w[t * TOPK..]).filter(|(e, _)| **e >= 0 && **e as usize / epr == r).map(|(_, &wk)| wk).collect();
                        if mine.is_empty() { acc } else { acc + bf16::from_f32(mine.iter().fold(0f32, |a, &wk| wk.mul_add(v, a))).to_f32() }
                    }),
                };
                want[t * HIDDEN + c] = bf16::from_f32(acc);
            }
        }
        same(&format!("{mode:?} combine"), &got, &want).map_err(|e| format!("rank {me}: {e}"))?;
        checked.push(format!("{mode:?}"));
    }
    Ok(format!(
        "rank {me} of {world} ({}): {TOKENS} tokens, rows per local expert match, combine ({}) matches the CPU in all {} values",
        g.device_name(),
        checked.join(", "),
        TOKENS * HIDDEN
    ))
}

fn main() {
    match run() {
        Ok(msg) => println!("{msg}"),
        Err(e) => {
            println!("FAILED: {e}");
            std::process::exit(1);
        }
    }
}
