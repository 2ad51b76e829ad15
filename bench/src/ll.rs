//! Low-latency benchmark: 128 tokens per rank, hidden 7168, top-8 of 256, FP8 dispatch, BF16
//! combine; both calls and their send/receive halves; the flag round trip beside them.

use crate::report::{Report, table};
use crate::{Opts, median};
use anyhow::{Result, ensure};
use cudarc::driver::sys;
use half::bf16;
use moe_ep::diag;
use moe_ep::ll::{LlBuffer, LlCombineArgs, LlCombineInput, LlConfig, LlDispatchArgs, LlPayload, ScaleFormat};
use moe_ep::reference::{LlWorld, Rng, Routing, gen_bf16, gen_routing};
use moe_ep::{Group, TopkIdx};

const EXPERTS: usize = 256;
const HIDDEN: usize = 7168;
const TOPK: usize = 8;
const TOKENS: usize = 128;

const OPS: [&str; 6] = ["dispatch", "combine", "dispatch send", "dispatch recv", "combine send", "combine recv"];

pub fn run(g: &Group, o: &Opts, rep: &mut Report) -> Result<()> {
    let world = g.world();
    let me = g.rank();
    let s = g.stream();
    let mut buf = LlBuffer::new(g, LlConfig::new(EXPERTS, HIDDEN, TOPK, TOKENS))?;
    let mut rng = Rng::new(0x11 ^ me as u64);
    let (idx_h, w_h) = gen_routing(&mut rng, TOKENS, TOPK, EXPERTS, world, Routing::Scores, 0.0);
    let x_h = gen_bf16(&mut rng, TOKENS * HIDDEN, 1.0);
    let x = s.clone_htod(&x_h.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
    let idx = s.clone_htod(&idx_h)?;
    let wts = s.clone_htod(&w_h)?;
    let out = s.alloc_zeros::<bf16>(TOKENS * HIDDEN)?;
    let epr = EXPERTS / world;
    let y = s.alloc_zeros::<bf16>(epr * world * TOKENS * HIDDEN)?;
    let topk = TopkIdx::I64(&idx);

    // Correctness first: BF16 dispatch, identity experts (combine of the received rows).
    {
        let (h, _) = buf.dispatch(s, &LlDispatchArgs { x: &x, topk_idx: topk, payload: LlPayload::Bf16, stats: None, hook: false })?;
        let rx = buf.recv_x_bf16(&h)?;
        buf.combine(s, &h, &LlCombineArgs { x: LlCombineInput::Tensor(&rx), topk_idx: topk, topk_weights: &wts, out: &out, hook: false })?;
        buf.check()?;
        let w = LlWorld {
            num_experts: EXPERTS,
            hidden: HIDDEN,
            k: TOPK,
            x: vec![x_h.clone()],
            topk_idx: vec![idx_h.clone()],
            topk_weights: vec![w_h.clone()],
        };
        let want = w.combine(0, &|t, _| x_h[t * HIDDEN..(t + 1) * HIDDEN].to_vec());
        let got: Vec<u16> = s.clone_dtoh(&out)?.iter().map(|v| v.to_bits()).collect();
        ensure!(got == want, "rank {me}: low-latency dispatch + combine differ from the reference");
    }
    g.host_barrier()?;

    let ctx = s.context();
    let ev = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let fp8 = LlDispatchArgs { x: &x, topk_idx: topk, payload: LlPayload::Fp8(ScaleFormat::F32), stats: None, hook: false };
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 6];
    let warm = 10;
    let iters = o.iters.max(50) * 2;
    // Every timed operation starts right after a GPU barrier (outside its events), so the
    // figure is the operation's latency with all ranks entering together, not the skew the
    // previous operation left between ranks.
    let combine = |hook| LlCombineArgs { x: LlCombineInput::Tensor(&y), topk_idx: topk, topk_weights: &wts, out: &out, hook };
    for it in 0..warm + iters {
        let mut t = [0f64; 6];
        let mut timed = |i: usize, f: &mut dyn FnMut() -> moe_ep::Result<()>| -> Result<()> {
            g.launch_barrier(s, 1)?;
            let (a, b) = (ev()?, ev()?);
            a.record(s)?;
            f()?;
            b.record(s)?;
            b.synchronize()?;
            t[i] = a.elapsed_ms(&b)? as f64 * 1e3;
            Ok(())
        };
        let mut h = None;
        timed(0, &mut || {
            h = Some(buf.dispatch(s, &fp8)?.0);
            Ok(())
        })?;
        let hd = h.take().unwrap();
        timed(1, &mut || buf.combine(s, &hd, &combine(false)).map(|_| ()))?;
        let mut hh = None;
        timed(2, &mut || {
            hh = Some(buf.dispatch(s, &LlDispatchArgs { hook: true, ..fp8 })?.0);
            Ok(())
        })?;
        let mut hh = hh.take().unwrap();
        timed(3, &mut || buf.dispatch_recv(s, &mut hh, None).map(|_| ()))?;
        let mut pending = None;
        timed(4, &mut || {
            pending = buf.combine(s, &hh, &combine(true))?.0;
            Ok(())
        })?;
        let p = pending.take().expect("hook mode returns the receive half");
        let mut p = Some(p);
        timed(5, &mut || buf.combine_recv(s, p.take().unwrap()).map(|_| ()))?;
        if it >= warm {
            for (v, x) in samples.iter_mut().zip(t) {
                v.push(x);
            }
        }
    }
    buf.check()?;
    let us: Vec<f64> = samples.iter_mut().map(|v| median(v)).collect();
    // The flag round trip in the same run.
    let mut rtt = f64::NAN;
    for _ in 0..2 {
        rtt = match me {
            0 => diag::ping_pong(g, 1, true, 2000)?.unwrap_or(f64::NAN),
            1 => {
                diag::ping_pong(g, 0, false, 2000)?;
                f64::NAN
            }
            _ => {
                g.barrier()?;
                f64::NAN
            }
        };
    }
    let mut vals = us.clone();
    vals.push(rtt);
    if let Some(all) = Report::gather(g, &vals)? {
        let mut rows = Vec::new();
        let mut worst = [0f64; 6];
        for (r, v) in all.iter().enumerate() {
            let mut row = vec![r.to_string()];
            for i in 0..6 {
                row.push(format!("{:.1}", v[i]));
                worst[i] = worst[i].max(v[i]);
            }
            row.push(format!("{:.1}", v[0] + v[1]));
            rows.push(row);
        }
        let mut srow = vec!["slowest".to_string()];
        srow.extend(worst.iter().map(|v| format!("{v:.1}")));
        srow.push(format!("{:.1}", worst[0] + worst[1]));
        rows.push(srow);
        let mut head = vec!["rank"];
        head.extend(OPS);
        head.push("dispatch + combine");
        let mut body = format!(
            "{TOKENS} tokens per rank, hidden {HIDDEN}, top-{TOPK} of {EXPERTS}, FP8 dispatch (f32 scales), BF16 combine; {} blocks x {} threads; microseconds (each operation timed from a common start: a GPU barrier precedes it, outside the timing), medians of {iters} runs; checked against the CPU reference first.\n\n",
            buf.config().num_blocks,
            buf.config().threads
        );
        body += &table(&head, &rows);
        body += &format!("\nFlag round trip in the same run (rank 0 <-> rank 1): {:.2} us.\n", all[0][6]);
        rep.section(&format!("Low-latency, EP{world}"), body);
    }
    Ok(())
}
