//! GPU tests of the high-throughput kernels against the CPU reference: both process modes,
//! every rank count, outputs poisoned first, fresh random inputs, whole outputs compared.

use anyhow::{Context, Result};
use half::bf16;
use moe_ep::TopkIdx;
use moe_ep::ht::{CombineArgs, DispatchArgs, HtBuffer, HtConfig, Payload, PushEngine};
use moe_ep::reference::{Rng, Routing, gen_bf16, gen_routing};
use moe_ep_tests::ht_case::{Case, run_case};
use moe_ep_tests::*;

fn cases(name: &str, list: Vec<Case>) -> Result<()> {
    run_cases(name, &list, run_case)
}

fn gpu2_ht_uniform_bf16_and_fp8() -> Result<()> {
    cases(
        "gpu2_ht_uniform_bf16_and_fp8",
        vec![
            Case::base(7168, 8, 256, 512),
            Case { fp8: true, ..Case::base(7168, 8, 256, 512) },
            Case { alignment: 128, i32_idx: true, ..Case::base(2048, 8, 64, 300) },
        ],
    )
}

fn gpu2_ht_edge_routing() -> Result<()> {
    cases(
        "gpu2_ht_edge_routing",
        vec![
            // -1 slots.
            Case { drop: 0.3, ..Case::base(2048, 8, 256, 256) },
            // A rank with zero tokens.
            Case { empty_rank: Some(1), ..Case::base(2048, 8, 256, 256) },
            // Every token to one rank (so the others receive nothing).
            Case { routing: Routing::OneRank(0), ..Case::base(2048, 8, 64, 256) },
            // Every token to the same experts.
            Case { routing: Routing::SameExperts(3), fp8: true, ..Case::base(2048, 2, 64, 256) },
        ],
    )
}

/// The bulk push (`cp.async.bulk` through shared memory) against the same reference: DeepSeek's
/// shape, dropped slots, an empty rank, every token to one rank, the smallest and largest rows.
fn gpu2_ht_bulk_push() -> Result<()> {
    let bulk = |c: Case| Case { push: PushEngine::Bulk, ..c };
    cases(
        "gpu2_ht_bulk_push",
        vec![
            bulk(Case::base(7168, 8, 256, 512)),
            bulk(Case { drop: 0.3, fp8: true, ..Case::base(2048, 8, 256, 256) }),
            bulk(Case { empty_rank: Some(1), ..Case::base(2048, 8, 256, 256) }),
            bulk(Case { routing: Routing::OneRank(0), ..Case::base(2048, 8, 64, 256) }),
            bulk(Case::base(128, 2, 64, 300)),
            bulk(Case::base(16384, 8, 256, 96)),
        ],
    )
}

fn gpu2_ht_shapes() -> Result<()> {
    let mut v = Vec::new();
    for hidden in [128, 2048, 7168, 8192, 16384] {
        v.push(Case::base(hidden, 8, 256, 96));
    }
    for k in [1, 2, 8] {
        v.push(Case::base(256, k, 0, 128));
        v.push(Case::base(512, k, 64, 128));
    }
    v.push(Case { fp8: true, ..Case::base(16384, 8, 256, 64) });
    cases("gpu2_ht_shapes", v)
}

/// Expected combine output when every rank returns the received rows unchanged: each token
/// summed once per rank it went to, in rank order (f32), rounded to bf16.
fn identity_combine(x: &[u16], idx: &[i64], k: usize, experts: usize, world: usize, hidden: usize) -> Vec<u16> {
    use moe_ep_kernels::fp::{bf16_to_f32, f32_to_bf16};
    let l = moe_ep::reference::layout(idx, k, experts, world);
    let n = idx.len() / k;
    let mut out = vec![0u16; n * hidden];
    for t in 0..n {
        let copies = (0..world).filter(|&r| l.is_token_in_rank[t * world + r] == 1).count();
        for c in 0..hidden {
            let mut acc = 0f32;
            for _ in 0..copies {
                acc += bf16_to_f32(x[t * hidden + c]);
            }
            out[t * hidden + c] = f32_to_bf16(acc);
        }
    }
    out
}

/// Layout, dispatch (no host synchronisation) and combine captured in one CUDA graph and
/// replayed 100 times with new tokens, routing and weights each time.
fn gpu2_ht_graph_replay_100() -> Result<()> {
    use cudarc::driver::sys;
    run_both_modes("gpu2_ht_graph_replay_100", |g, seed| {
        let (hd, k, t) = (1024, 8, 256);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let s = g.stream().clone();
        let mut buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let make = |it: u64| {
            let mut rng = Rng::new(seed ^ it.wrapping_mul(0x9e37_79b9) ^ me as u64);
            let (idx, w) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.2);
            (gen_bf16(&mut rng, t * hd, 1.0), idx, w)
        };
        let (x0, i0, w0) = make(0);
        let mut x = upload(&s, &x0.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
        let mut idx = upload(&s, &i0)?;
        let mut wts = upload(&s, &w0)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let layout = buf.new_layout(&s, t, k)?;
        let mut h = buf.new_handle(&layout)?;
        let run = |buf: &mut HtBuffer, h: &mut moe_ep::ht::Handle| -> moe_ep::Result<()> {
            buf.layout_into(&s, TopkIdx::I64(&idx), &layout)?;
            let args = DispatchArgs {
                x: Payload::Bf16(&x),
                topk_idx: Some(TopkIdx::I64(&idx)),
                topk_weights: Some(&wts),
                expert_alignment: 1,
                wait_for_counts: false,
            };
            buf.dispatch_into(&s, h, &args)?;
            let y = buf.recv_x_bf16(h)?;
            buf.combine(&s, h, &CombineArgs { x: &y, topk_weights: None, bias: [None, None], out: &out, out_weights: None })?;
            Ok(())
        };
        run(&mut buf, &mut h)?;
        buf.check()?;
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let captured = run(&mut buf, &mut h);
        let graph = s.end_capture(sys::CUgraphInstantiate_flags(0))?;
        captured?;
        let graph = graph.context("empty graph")?;
        for it in 1..=100u64 {
            let (xn, inn, wn) = make(it);
            x.write(&s, &xn.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
            idx.write(&s, &inn)?;
            wts.write(&s, &wn)?;
            graph.launch()?;
            g.check()?;
            let got: Vec<u16> = out.to_vec(&s)?.iter().map(|v| v.to_bits()).collect();
            compare(&format!("replay {it}: combined rows"), &got, &identity_combine(&xn, &inn, k, e, world, hd))?;
        }
        Ok(())
    })
}

/// Dispatch and combine on a separate communication stream, ordered with the compute stream
/// only through the events the operations return.
fn gpu2_ht_async_streams() -> Result<()> {
    run_both_modes("gpu2_ht_async_streams", |g, seed| {
        let (hd, k, t) = (2048, 8, 512);
        let world = g.world();
        let e = experts_for(world, 256);
        let me = g.rank();
        let compute = g.context().new_stream()?;
        let comm = g.context().new_stream()?;
        let mut buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut rng = Rng::new(seed ^ me as u64);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x_h = gen_bf16(&mut rng, t * hd, 1.0);
        // Inputs are produced on the compute stream...
        let x = upload(&compute, &x_h.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
        let idx = upload(&compute, &idx_h)?;
        let wts = upload(&compute, &w_h)?;
        let out = poisoned(&compute, t * hd, bf16::from_bits(0xFFFF))?;
        let ready = compute.record_event(None)?;
        // ...and consumed on the communication stream after it waits for them.
        comm.wait(&ready)?;
        let layout = buf.layout(&comm, TopkIdx::I64(&idx), k)?;
        let (h, dispatched) = buf.dispatch(&comm, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
        compute.wait(&dispatched)?;
        let y = buf.recv_x_bf16(&h)?;
        let combined = buf.combine(&comm, &h, &CombineArgs { x: &y, topk_weights: None, bias: [None, None], out: &out, out_weights: None })?;
        compute.wait(&combined)?;
        let got: Vec<u16> = out.to_vec(&compute)?.iter().map(|v| v.to_bits()).collect();
        compare("combined rows", &got, &identity_combine(&x_h, &idx_h, k, e, world, hd))?;
        buf.check()?;
        Ok(())
    })
}

/// Misuse is refused with a typed error before anything is launched: a handle whose routing
/// was recomputed, a handle or layout of another buffer, a stale handle, configurations that
/// differ across ranks.
fn gpu2_ht_misuse_is_refused() -> Result<()> {
    run_both_modes("gpu2_ht_misuse_is_refused", |g, seed| {
        let (hd, k, t) = (256, 4, 64);
        let world = g.world();
        let e = experts_for(world, 64);
        let s = g.stream().clone();
        let mut a = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut b = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut rng = Rng::new(seed ^ g.rank() as u64);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x = upload(&s, &gen_bf16(&mut rng, t * hd, 1.0).iter().map(|&v| bf16::from_bits(v)).collect::<Vec<_>>())?;
        let idx = upload(&s, &idx_h)?;
        let wts = upload(&s, &w_h)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let layout = a.layout(&s, TopkIdx::I64(&idx), k)?;
        let args = DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts);
        let (mut h, _) = a.dispatch(&s, &layout, &args)?;
        expect_refused(b.new_handle(&layout), "ForeignHandle", "layout of another buffer")?;
        // A configuration that differs across ranks is refused on every rank before anything
        // is allocated (each receiver would otherwise wait for its own grid size).
        // (Each rank's grid within its SMs, on a shared GPU too.)
        let skewed = HtConfig { num_sms: skewed_grid(g), ..HtConfig::new(e, hd, k, t, world) };
        match HtBuffer::new(g, skewed) {
            Err(moe_ep::Error::CollectiveMismatch { .. }) => {}
            Err(e) => anyhow::bail!("mismatched configurations: expected CollectiveMismatch, got {e}"),
            Ok(_) => anyhow::bail!("mismatched configurations were accepted"),
        }
        expect_refused(b.cached_dispatch(&s, &mut h, &args), "ForeignHandle", "handle of another buffer")?;
        let y = a.recv_x_bf16(&h)?.to_vec(&s)?;
        let y = upload(&s, &y)?;
        a.layout_into(&s, TopkIdx::I64(&idx), &layout)?;
        let cargs = CombineArgs { x: &y, topk_weights: None, bias: [None, None], out: &out, out_weights: None };
        expect_refused(a.combine(&s, &h, &cargs), "StaleHandle", "handle whose layout was recomputed")?;
        expect_refused(a.cached_dispatch(&s, &mut h, &args), "StaleHandle", "cached dispatch after the layout changed")?;
        // After a fresh full dispatch the handle is good again; an older handle is stale.
        let (h2, _) = a.dispatch(&s, &layout, &args)?;
        a.dispatch_into(&s, &mut h, &args)?;
        expect_refused(a.recv_x_bf16(&h2), "StaleHandle", "stale handle")?;
        a.combine(&s, &h, &cargs)?;
        a.check()?;
        // Poisoning overwrites the receive metadata a combine computes peer addresses from:
        // every handle is stale until a dispatch (here a cached one) writes it again.
        a.poison(&s, 0xEE)?;
        expect_refused(a.combine(&s, &h, &cargs), "StaleHandle", "a combine with a handle from before poison")?;
        expect_refused(a.recv_x_bf16(&h), "StaleHandle", "a view from before poison")?;
        a.cached_dispatch(&s, &mut h, &args)?;
        a.combine(&s, &h, &cargs)?;
        a.check()?;
        Ok(())
    })
}

/// A device-detected error fails the group: an expert id outside the model is reported by the
/// layout kernel (`InvalidExpert` from `check`), and every later operation is refused with
/// `GroupFailed` instead of running on stale state (on the peers too, which hear of it).
fn gpu2_ht_device_error_fails_the_group() -> Result<()> {
    run_both_modes("gpu2_ht_device_error_fails_the_group", |g, seed| {
        let (hd, k, t) = (256, 4, 64);
        let world = g.world();
        let e = experts_for(world, 64);
        let s = g.stream().clone();
        let mut buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut rng = Rng::new(seed ^ g.rank() as u64);
        let (mut idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        idx_h[3 * k + 1] = (e + 5) as i64;
        let x = upload(&s, &gen_bf16(&mut rng, t * hd, 1.0).iter().map(|&v| bf16::from_bits(v)).collect::<Vec<_>>())?;
        let idx = upload(&s, &idx_h)?;
        let wts = upload(&s, &w_h)?;
        // Every rank has the same bad id. A rank whose peer found it first has already heard
        // (fast failure): its own layout or check is then refused with the peer's error.
        let bad = format!("token 3 holds {}", e + 5);
        let layout = match buf.layout(&s, TopkIdx::I64(&idx), k) {
            Ok(layout) => Some(layout),
            Err(moe_ep::Error::GroupFailed { cause }) if cause.contains(&bad) => None,
            Err(other) => anyhow::bail!("a layout with a bad expert id: expected it to run (or GroupFailed naming a peer's {bad}), got {other}"),
        };
        match buf.check() {
            Err(moe_ep::Error::InvalidExpert { token: 3, value, .. }) if value == (e + 5) as i64 => {}
            Err(moe_ep::Error::GroupFailed { cause }) if cause.contains(&bad) => {}
            Ok(()) if layout.is_none() => {}
            other => anyhow::bail!("a bad expert id: expected InvalidExpert naming token 3, got {other:?}"),
        }
        let Some(layout) = layout else {
            expect_refused(g.barrier(), "GroupFailed", "a group barrier after a peer's error")?;
            return Ok(());
        };
        expect_refused(buf.dispatch(&s, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts)), "GroupFailed", "a dispatch after the error")?;
        expect_refused(buf.layout(&s, TopkIdx::I64(&idx), k), "GroupFailed", "a layout after the error")?;
        expect_refused(g.barrier(), "GroupFailed", "a group barrier after the error")?;
        Ok(())
    })
}

/// A device error reaches the peers with its details, though no one reads the record: only the
/// last rank's routing holds a bad expert id, and no rank calls `check`; within 2 s every rank's
/// `Group::failure` names the culprit, the token and the value (the watchdog passes on the copy
/// of the record the device writes to host-mapped memory, not just the error's kind).
fn gpu2_ht_device_error_reaches_peers_with_details() -> Result<()> {
    run_both_modes("gpu2_ht_device_error_reaches_peers_with_details", |g, seed| {
        let (hd, k, t) = (256, 4, 64);
        let (world, culprit) = (g.world(), g.world() - 1);
        let e = experts_for(world, 64);
        let s = g.stream().clone();
        let buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut rng = Rng::new(seed ^ g.rank() as u64);
        let (mut idx_h, _) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        if g.rank() == culprit {
            idx_h[3 * k + 1] = (e + 7) as i64;
        }
        let idx = upload(&s, &idx_h)?;
        g.barrier()?;
        // The peers' layouts wait for the culprit's counts and stop on its failure; either a
        // refusal or a launch is fine here: what matters is what `failure` says.
        let _ = buf.layout(&s, TopkIdx::I64(&idx), k);
        let t0 = std::time::Instant::now();
        let cause = loop {
            if let Some(c) = g.failure() {
                break c;
            }
            anyhow::ensure!(t0.elapsed() < std::time::Duration::from_secs(2), "rank {}: no failure 2 s after the bad layout", g.rank());
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        let want = format!("token 3 holds {}", e + 7);
        anyhow::ensure!(
            cause.contains(&want) && cause.contains(&format!("rank {culprit}")),
            "rank {}: the failure is {cause:?}; expected it to name rank {culprit} and {want:?}",
            g.rank()
        );
        println!("rank {}: {cause}", g.rank());
        expect_refused(g.barrier(), "GroupFailed", "a group barrier after the error")
    })
}

/// A busy stream is not a failure: with a 1 s GPU wait deadline, 2.5 s of GPU work queued
/// ahead of a dispatch that waits for its counts keeps the count exchange from running until
/// the host's wait (deadline + 1 s) has passed; the dispatch must then find the counts once the
/// stream is done, and succeed with the right rows, instead of failing the group. Processes only
/// (the deadline is the children's).
fn gpu2_ht_busy_stream_is_not_a_failure() -> Result<()> {
    let name = "gpu2_ht_busy_stream_is_not_a_failure";
    let worlds = rank_counts(name)?;
    if !in_child() {
        report_line("ranks", name, &format!("{worlds:?}"));
    }
    for world in worlds {
        let seed = fresh_seed(name);
        if !in_child() {
            println!("{name}: {world} ranks, processes, 1 s GPU deadline, seed {seed}");
        }
        run_processes_with_env(name, world, seed, &[("MOE_EP_TEST_TIMEOUT_MS", "1000")], |g| {
            let (hd, k, t) = (256, 4, 64);
            let e = experts_for(g.world(), 64);
            let s = g.stream().clone();
            anyhow::ensure!(g.config().timeout == std::time::Duration::from_secs(1), "the GPU deadline is {:?}", g.config().timeout);
            let mut buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, g.world()).fit_sms(g.sm_count()))?;
            let mut rng = Rng::new(seed ^ g.rank() as u64);
            let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, g.world(), Routing::Scores, 0.0);
            let x = upload(&s, &gen_bf16(&mut rng, t * hd, 1.0).iter().map(|&v| bf16::from_bits(v)).collect::<Vec<_>>())?;
            let idx = upload(&s, &idx_h)?;
            let wts = upload(&s, &w_h)?;
            // The caller's own stream (not the group's, on which the library's own small copies
            // would wait for the queued work before the dispatch is even launched).
            let cs = g.context().new_stream()?;
            s.synchronize()?;
            let layout = buf.layout(&cs, TopkIdx::I64(&idx), k)?;
            cs.synchronize()?;
            g.barrier()?;
            moe_ep::diag::launch_gpu_sleep(g, &cs, std::time::Duration::from_millis(2500))?;
            let t0 = std::time::Instant::now();
            let (h, _) = buf.dispatch(&cs, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
            let took = t0.elapsed();
            anyhow::ensure!(
                took > std::time::Duration::from_secs(2),
                "the dispatch returned after {took:?}: the stream was not busy long enough to test anything"
            );
            buf.check()?;
            anyhow::ensure!(g.failure().is_none(), "the group failed: {:?}", g.failure());
            // The right number of rows arrived (every rank's tokens that chose this rank).
            let all: Vec<Vec<i64>> = g
                .all_gather_bytes(bytemuck::cast_slice(&idx_h))?
                .iter()
                .map(|b| b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
                .collect();
            let epr = (e / g.world()) as i64;
            let want: usize = all.iter().map(|ri| ri.chunks(k).filter(|tok| tok.iter().any(|&x| x >= 0 && x / epr == g.rank() as i64)).count()).sum();
            anyhow::ensure!(h.num_recv() == Some(want), "rank {}: {:?} rows received, expected {want}", g.rank(), h.num_recv());
            println!("rank {}: the dispatch behind 2.5 s of queued work returned after {took:?} with its {want} rows", g.rank());
            Ok(())
        })
        .with_context(|| format!("{world} ranks, processes, seed {seed}"))?;
    }
    Ok(())
}

/// A handle dropped right after its combine was queued behind other work: its device arrays
/// must outlive the combine. The next handle's allocation may get the same memory back (the
/// test says whether it did); were the arrays freed and reused out of the caller's stream order,
/// that allocation's zeroing would land under the queued combine, which would then send every
/// row to the wrong place.
fn gpu2_ht_handle_dropped_under_queued_combine() -> Result<()> {
    run_both_modes("gpu2_ht_handle_dropped_under_queued_combine", |g, seed| {
        use moe_ep::DeviceArg;
        let (hd, k, t) = (2048, 8, 256);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        // The caller's stream, not the group's.
        let cs = g.context().new_stream()?;
        let mut buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut rng = Rng::new(seed ^ me as u64);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x_h = gen_bf16(&mut rng, t * hd, 1.0);
        let x = upload(&cs, &x_h.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
        let idx = upload(&cs, &idx_h)?;
        let wts = upload(&cs, &w_h)?;
        let out = poisoned(&cs, t * hd, bf16::from_bits(0xFFFF))?;
        let layout = buf.layout(&cs, TopkIdx::I64(&idx), k)?;
        // Waits for the counts: the handle's arrays are written when this returns.
        let (h, _) = buf.dispatch(&cs, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
        let old = h.src_base_device().device_addr();
        moe_ep::diag::launch_gpu_sleep(g, &cs, std::time::Duration::from_millis(300))?;
        let y = buf.recv_x_bf16(&h)?;
        buf.combine(&cs, &h, &CombineArgs { x: &y, topk_weights: None, bias: [None, None], out: &out, out_weights: None })?;
        drop(h);
        let h2 = buf.new_handle(&layout)?;
        let reused = h2.src_base_device().device_addr() == old;
        let got: Vec<u16> = out.to_vec(&cs)?.iter().map(|v| v.to_bits()).collect();
        compare("rows combined with a handle dropped under the queued combine", &got, &identity_combine(&x_h, &idx_h, k, e, world, hd))?;
        println!("rank {me}: the next handle got the dropped handle's memory back: {reused}");
        buf.check()?;
        Ok(())
    })
}

/// Releasing buffers. `destroy` is collective and frees at once. A drop runs no collective
/// (it used to meet every rank twice, waiting up to 30 s for each): rank 0 drops its buffer
/// while its peers are busy for 1.5 s, and must return at once, its memory kept (quarantined)
/// until every rank has dropped it and then freed by the next collective. Ranks that destroy
/// different buffers get `CollectiveMismatch`, and the group goes on.
fn gpu2_buffer_drop_and_destroy() -> Result<()> {
    run_both_modes("gpu2_buffer_drop_and_destroy", |g, _seed| {
        let world = g.world();
        let e = experts_for(world, 64);
        let cfg = HtConfig::new(e, 256, 4, 64, world).fit_sms(g.sm_count());
        let bytes = cfg.heap_bytes(world) as usize;
        anyhow::ensure!(g.quarantined_bytes() == 0, "{} bytes quarantined before any buffer", g.quarantined_bytes());
        HtBuffer::new(g, cfg)?.destroy()?;
        anyhow::ensure!(g.quarantined_bytes() == 0, "{} bytes quarantined after destroy", g.quarantined_bytes());

        let b = HtBuffer::new(g, cfg)?;
        g.barrier()?;
        if g.rank() == 0 {
            let t0 = std::time::Instant::now();
            drop(b);
            let took = t0.elapsed();
            anyhow::ensure!(took < std::time::Duration::from_millis(500), "rank 0's drop took {took:?} while its peers were busy");
            anyhow::ensure!(
                g.quarantined_bytes() == bytes,
                "{} bytes quarantined after the drop, expected the heap's {bytes}",
                g.quarantined_bytes()
            );
            println!("rank 0: dropped a buffer in {took:?} while its peers were busy; {bytes} bytes quarantined");
        } else {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            drop(b);
        }
        let freed = g.reclaim_dropped()?;
        anyhow::ensure!(
            freed == bytes && g.quarantined_bytes() == 0,
            "reclaim freed {freed} of {bytes} bytes; {} still quarantined",
            g.quarantined_bytes()
        );

        let ll = moe_ep::ll::LlConfig::new(e, 256, 4, 16);
        let (c, d) = (moe_ep::ll::LlBuffer::new(g, ll)?, moe_ep::ll::LlBuffer::new(g, ll)?);
        let (destroyed, dropped) = if g.rank() == 0 { (c, d) } else { (d, c) };
        drop(dropped);
        let r = destroyed.destroy();
        expect_refused(r, "CollectiveMismatch", "ranks destroying different buffers")?;
        anyhow::ensure!(g.failure().is_none(), "a mismatched destroy failed the group: {:?}", g.failure());
        // Both are dropped now on every rank (one destroyed in vain, one dropped): both go back.
        let freed = g.reclaim_dropped()?;
        let want = 2 * ll.heap_bytes(world) as usize;
        anyhow::ensure!(
            freed == want && g.quarantined_bytes() == 0,
            "reclaim freed {freed} of {want} bytes; {} still quarantined",
            g.quarantined_bytes()
        );
        Ok(())
    })
}

/// Corrupt indices in received data are reported, never followed: after every rank's
/// dispatch, each rank overwrites its handle's copy of the received rows' source tokens (as
/// memory overwritten under it would), then combines. The token indices read are out of range;
/// the kernels must report `BadIndex` (here, or passed on by a peer) instead of writing through
/// them into another rank's memory.
fn gpu2_ht_corrupt_indices_are_reported() -> Result<()> {
    run_both_modes("gpu2_ht_corrupt_indices_are_reported", |g, seed| {
        let (hd, k, t) = (256, 4, 64);
        let world = g.world();
        let e = experts_for(world, 64);
        let s = g.stream().clone();
        let mut buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut rng = Rng::new(seed ^ g.rank() as u64);
        let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
        let x = upload(&s, &gen_bf16(&mut rng, t * hd, 1.0).iter().map(|&v| bf16::from_bits(v)).collect::<Vec<_>>())?;
        let idx = upload(&s, &idx_h)?;
        let wts = upload(&s, &w_h)?;
        let out = poisoned(&s, t * hd, bf16::from_bits(0xFFFF))?;
        let layout = buf.layout(&s, TopkIdx::I64(&idx), k)?;
        let (h, _) = buf.dispatch(&s, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
        let y = upload(&s, &buf.recv_x_bf16(&h)?.to_vec(&s)?)?;
        g.barrier()?;
        buf.corrupt_handle_for_testing(&s, &h, 0xEE)?;
        g.barrier()?;
        let args = CombineArgs { x: &y, topk_weights: None, bias: [None, None], out: &out, out_weights: None };
        expect_bad_index(buf.combine(&s, &h, &args).and_then(|_| buf.check()), "a combine over corrupt receive metadata")?;
        println!("rank {}: the corrupt metadata was reported: {:?}", g.rank(), g.failure());
        Ok(())
    })
}

/// Two dispatches in flight (two micro-batches): dispatch A, dispatch B (other tokens and
/// routing), then combine A and combine B. Each handle keeps what its combine needs, so both
/// combines are exact although B's dispatch overwrote A's received rows in the buffer.
fn gpu2_ht_two_dispatches_in_flight() -> Result<()> {
    run_both_modes("gpu2_ht_two_dispatches_in_flight", |g, seed| {
        let (hd, k, t) = (1024, 8, 256);
        let world = g.world();
        let e = experts_for(world, 64);
        let me = g.rank();
        let s = g.stream().clone();
        let mut buf = HtBuffer::new(g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
        let mut batches = Vec::new();
        for b in 0..2u64 {
            let mut rng = Rng::new(seed ^ (b + 1).wrapping_mul(0x9e37) ^ me as u64);
            let n = t - 37 * b as usize;
            let (idx_h, w_h) = gen_routing(&mut rng, n, k, e, world, Routing::Scores, 0.0);
            let x_h = gen_bf16(&mut rng, n * hd, 1.0);
            let x = upload(&s, &x_h.iter().map(|&v| bf16::from_bits(v)).collect::<Vec<_>>())?;
            let idx = upload(&s, &idx_h)?;
            let wts = upload(&s, &w_h)?;
            let layout = buf.layout(&s, TopkIdx::I64(&idx), k)?;
            let (h, _) = buf.dispatch(&s, &layout, &DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
            // The expert outputs: the received rows themselves (identity experts), copied out.
            let y = upload(&s, &buf.recv_x_bf16(&h)?.to_vec(&s)?)?;
            batches.push((n, x_h, idx_h, h, y));
        }
        for (b, (n, x_h, idx_h, h, y)) in batches.iter().enumerate() {
            let out = poisoned(&s, n * hd, bf16::from_bits(0xFFFF))?;
            buf.combine(&s, h, &CombineArgs { x: y, topk_weights: None, bias: [None, None], out: &out, out_weights: None })?;
            let got: Vec<u16> = out.to_vec(&s)?.iter().map(|v| v.to_bits()).collect();
            compare(&format!("combine of dispatch {b} of 2 in flight"), &got, &identity_combine(x_h, idx_h, k, e, world, hd))?;
        }
        buf.check()?;
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    gpu_main(&[
        ("gpu2_ht_uniform_bf16_and_fp8", gpu2_ht_uniform_bf16_and_fp8),
        ("gpu2_ht_edge_routing", gpu2_ht_edge_routing),
        ("gpu2_ht_shapes", gpu2_ht_shapes),
        ("gpu2_ht_bulk_push", gpu2_ht_bulk_push),
        ("gpu2_ht_graph_replay_100", gpu2_ht_graph_replay_100),
        ("gpu2_ht_async_streams", gpu2_ht_async_streams),
        ("gpu2_ht_misuse_is_refused", gpu2_ht_misuse_is_refused),
        ("gpu2_ht_device_error_fails_the_group", gpu2_ht_device_error_fails_the_group),
        ("gpu2_ht_device_error_reaches_peers_with_details", gpu2_ht_device_error_reaches_peers_with_details),
        ("gpu2_ht_busy_stream_is_not_a_failure", gpu2_ht_busy_stream_is_not_a_failure),
        ("gpu2_ht_handle_dropped_under_queued_combine", gpu2_ht_handle_dropped_under_queued_combine),
        ("gpu2_buffer_drop_and_destroy", gpu2_buffer_drop_and_destroy),
        ("gpu2_ht_two_dispatches_in_flight", gpu2_ht_two_dispatches_in_flight),
        ("gpu2_ht_corrupt_indices_are_reported", gpu2_ht_corrupt_indices_are_reported),
    ])
}
