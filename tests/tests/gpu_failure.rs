//! GPU tests of fast failure: a rank that dies (SIGKILL) in the middle of a high-throughput or
//! low-latency dispatch, or that calls `Group::abort`, is named to every other rank in a typed
//! error within 2 s (the wait deadline is 20 s), and the survivors can build a new group on the
//! same GPUs and run on it.

use anyhow::{Result, bail, ensure};
use half::bf16;
use moe_ep::ht::{self, HtBuffer, HtConfig};
use moe_ep::ll::{self, LlBuffer, LlConfig};
use moe_ep::reference::{Rng, Routing, gen_bf16, gen_routing};
use moe_ep::{Error, Group, TopkIdx, diag};
use moe_ep_tests::*;
use std::time::{Duration, Instant};

/// How fast a survivor must learn of a dead or aborting peer.
const NOTICE: Duration = Duration::from_secs(2);

/// One process per GPU; the last rank dies right before the dispatch (its peers are inside
/// the layout, count exchange and dispatch kernels, waiting for it); the others must get an
/// error naming it within 2 s, then rebuild a group without it.
fn gpu2_ht_killed_rank_is_named() -> Result<()> {
    run_kill_test(
        "gpu2_ht_killed_rank_is_named",
        |world| world - 1,
        |g, victim, seed| {
            let me = g.rank();
            {
                let (hd, k, t) = (1024, 8, 256);
                let world = g.world();
                let e = experts_for(world, 64);
                let s = g.stream().clone();
                let mut buf = HtBuffer::new(&g, HtConfig::new(e, hd, k, t, world).fit_sms(g.sm_count()))?;
                let mut rng = Rng::new(seed ^ me as u64);
                let (idx_h, w_h) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
                let x = upload(&s, bytemuck::cast_slice::<u16, bf16>(&gen_bf16(&mut rng, t * hd, 1.0)))?;
                let idx = upload(&s, &idx_h)?;
                let wts = upload(&s, &w_h)?;
                g.barrier()?;
                if me == victim {
                    kill_self();
                }
                let t0 = Instant::now();
                let r = (|| -> moe_ep::Result<()> {
                    let layout = buf.layout(&s, TopkIdx::I64(&idx), k)?;
                    buf.dispatch(&s, &layout, &ht::DispatchArgs::bf16(&x, TopkIdx::I64(&idx), &wts))?;
                    buf.check()
                })();
                let took = t0.elapsed();
                println!("rank {me}: learned of rank {victim}'s death in {took:?}: {}", r.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
                expect_peer_failure(r, me, victim)?;
                ensure!(took < NOTICE, "rank {me}: rank {victim}'s death took {took:?} to surface");
                expect_refused(g.barrier(), "GroupFailed", "a barrier after the death")?;
            }
            survivors_run(rejoin_without(g, victim)?, seed)
        },
    )
}

/// As above for the low-latency dispatch, with rank 0 (the rendezvous root) as the victim.
fn gpu2_ll_killed_rank_is_named() -> Result<()> {
    run_kill_test(
        "gpu2_ll_killed_rank_is_named",
        |_| 0,
        |g, victim, seed| {
            let me = g.rank();
            {
                let (hd, k, t) = (2048, 8, 64);
                let world = g.world();
                let e = experts_for(world, 64);
                let s = g.stream().clone();
                let mut buf = LlBuffer::new(&g, LlConfig::new(e, hd, k, t))?;
                let mut rng = Rng::new(seed ^ me as u64);
                let (idx_h, _) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.0);
                let x = upload(&s, bytemuck::cast_slice::<u16, bf16>(&gen_bf16(&mut rng, t * hd, 1.0)))?;
                let idx = upload(&s, &idx_h)?;
                g.barrier()?;
                if me == victim {
                    kill_self();
                }
                let t0 = Instant::now();
                let r = buf.dispatch(&s, &ll::DispatchArgs::fp8(&x, TopkIdx::I64(&idx))).and_then(|_| buf.check());
                let took = t0.elapsed();
                println!("rank {me}: learned of rank {victim}'s death in {took:?}: {}", r.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
                expect_peer_failure(r, me, victim)?;
                ensure!(took < NOTICE, "rank {me}: rank {victim}'s death took {took:?} to surface");
            }
            survivors_run(rejoin_without(g, victim)?, seed)
        },
    )
}

/// The survivors' new group works: barriers and the heap round trip over the same GPUs.
fn survivors_run(g: Group, seed: u64) -> Result<()> {
    g.barrier()?;
    let bad = diag::heap_pattern_roundtrip(&g, 4096 + 4, seed as u32, 2)?;
    ensure!(bad.iter().all(|&b| b == 0), "rank {} of the new group: mismatching words {bad:?}", g.rank());
    println!("rank {} of {}: the survivors' group runs", g.rank(), g.world());
    Ok(())
}

/// Both process modes: the last rank calls `Group::abort` while the others wait on the GPU for
/// a flag nobody writes (20 s deadline); they stop with `PeerFailed` naming it within 2 s, and
/// every rank's group refuses further work.
fn gpu2_abort_stops_every_rank() -> Result<()> {
    run_both_modes("gpu2_abort_stops_every_rank", |g, _| {
        let (me, culprit) = (g.rank(), g.world() - 1);
        g.barrier()?;
        let delay = Duration::from_millis(300);
        if me == culprit {
            std::thread::sleep(delay);
            g.abort("the test aborts");
            ensure!(g.failure().is_some_and(|c| c.contains("the test aborts")), "failure cause: {:?}", g.failure());
        } else {
            let t0 = Instant::now();
            let r = diag::wait_for_silent_peer(g, culprit, Duration::from_secs(20));
            let took = t0.elapsed();
            match r {
                Err(Error::PeerFailed { rank, peer, cause, .. }) => {
                    ensure!(rank == me && peer == culprit, "PeerFailed names rank {rank} / peer {peer}, expected {me} / {culprit}");
                    ensure!(cause.contains("the test aborts"), "cause {cause:?}");
                }
                other => bail!("rank {me}: expected PeerFailed naming rank {culprit}, got {other:?}"),
            }
            ensure!(took < delay + NOTICE, "rank {me}: the abort took {:?} to surface", took.saturating_sub(delay));
            println!("rank {me}: the abort surfaced {:?} after it was called", took.saturating_sub(delay));
        }
        expect_refused(g.barrier(), "GroupFailed", "a barrier after the abort")
    })
}

/// `check` waits for this rank's own kernels only, never for another stream of the context
/// (torch's, NCCL's: in serving, one stuck behind a dead peer): a stream that is not the
/// library's is held for 3 s by a host function (`cuLaunchHostFunc`), and a barrier and `check`
/// must return within 1 s meanwhile. A context synchronisation would wait the 3 s.
fn gpu2_check_ignores_other_streams() -> Result<()> {
    extern "C" fn hold_3s(_: *mut std::ffi::c_void) {
        std::thread::sleep(Duration::from_secs(3));
    }
    run_both_modes("gpu2_check_ignores_other_streams", |g, _seed| {
        use cudarc::driver::sys;
        let blocked = g.context().new_stream()?;
        // SAFETY: a host function that only sleeps (it makes no CUDA call), with no data.
        unsafe { sys::cuLaunchHostFunc(blocked.cu_stream(), Some(hold_3s), std::ptr::null_mut()) }.result()?;
        let t0 = Instant::now();
        let r = g.barrier();
        let took = t0.elapsed();
        blocked.synchronize()?;
        let held = t0.elapsed();
        r?;
        ensure!(held >= Duration::from_millis(2500), "the other stream was held only {held:?}: the test tested nothing");
        ensure!(took < Duration::from_secs(1), "a barrier and check took {took:?} with another stream of the context held for 3 s");
        println!("rank {}: barrier + check in {took:?} while another stream of the context was held for 3 s", g.rank());
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    gpu_main(&[
        ("gpu2_abort_stops_every_rank", gpu2_abort_stops_every_rank),
        ("gpu2_check_ignores_other_streams", gpu2_check_ignores_other_streams),
        ("gpu2_ht_killed_rank_is_named", gpu2_ht_killed_rank_is_named),
        ("gpu2_ll_killed_rank_is_named", gpu2_ll_killed_rank_is_named),
    ])
}
