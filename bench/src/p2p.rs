//! The physical limits: P2P store bandwidth per pair and all at once, flag round trip.

use crate::Opts;
use crate::report::{Report, table};
use anyhow::Result;
use moe_ep::Group;
use moe_ep::diag::{self, CopyEngine, P2pProbe};

pub fn run(g: &Group, o: &Opts, rep: &mut Report) -> Result<()> {
    let world = g.world();
    let me = g.rank();
    let bytes: u64 = if o.quick { 64 << 20 } else { 256 << 20 };
    let iters = if o.quick { 3 } else { 8 };
    let probe = P2pProbe::new(g, bytes)?;
    let all = g.sm_count();
    let configs = [
        (CopyEngine::Registers, 8),
        (CopyEngine::Registers, 24),
        (CopyEngine::Registers, all),
        (CopyEngine::Bulk, 8),
        (CopyEngine::Bulk, 24),
        (CopyEngine::Bulk, all),
    ];
    let mut rows = Vec::new();
    let mut best_reg_per_pair = Vec::new();
    for src in 0..world {
        for dst in 0..world {
            if src == dst {
                continue;
            }
            let mut best = 0f64;
            for &(engine, sms) in &configs {
                g.host_barrier()?;
                let v = if me == src { probe.copy_bandwidth(g, g.stream(), dst, sms, engine, iters)? } else { f64::NAN };
                if let Some(all_v) = Report::gather(g, &[v])? {
                    let gbs = all_v[src][0];
                    if engine == CopyEngine::Registers {
                        best = best.max(gbs);
                    }
                    rows.push(vec![format!("{src} -> {dst}"), format!("{engine:?}"), sms.to_string(), format!("{gbs:.1}")]);
                }
            }
            best_reg_per_pair.push(best);
        }
    }
    // Every rank stores to its ring neighbour at once.
    let mut ring = Vec::new();
    for &(engine, sms) in &[(CopyEngine::Registers, 24), (CopyEngine::Registers, all), (CopyEngine::Bulk, 24)] {
        g.host_barrier()?;
        let v = probe.copy_bandwidth(g, g.stream(), (me + 1) % world, sms, engine, iters)?;
        if let Some(all_v) = Report::gather(g, &[v])? {
            let per: Vec<f64> = all_v.iter().map(|r| r[0]).collect();
            let min = per.iter().cloned().fold(f64::MAX, f64::min);
            ring.push(vec![
                format!("{engine:?}"),
                sms.to_string(),
                per.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" / "),
                format!("{min:.1}"),
            ]);
        }
    }
    // Flag round trips between rank 0 and every other rank.
    let mut rtts = Vec::new();
    for peer in 1..world {
        let iters = 2000;
        let mut rtt = f64::NAN;
        for _ in 0..2 {
            // First run warms up; the second is reported.
            rtt = match me {
                0 => diag::ping_pong(g, peer, true, iters)?.unwrap_or(f64::NAN),
                m if m == peer => {
                    diag::ping_pong(g, 0, false, iters)?;
                    f64::NAN
                }
                _ => {
                    // Idle ranks still take part in the barriers inside ping_pong.
                    g.barrier()?;
                    f64::NAN
                }
            };
        }
        if let Some(v) = Report::gather(g, &[rtt])? {
            rtts.push((peer, v[0][0]));
        }
    }
    if me == 0 {
        let min_pair = best_reg_per_pair.iter().cloned().fold(f64::MAX, f64::min);
        let max_rtt = rtts.iter().map(|r| r.1).fold(0.0, f64::max);
        let mut body = table(&["pair", "engine", "SMs", "GB/s"], &rows);
        body += &format!("\nAll ranks storing to their ring neighbour at once ({} MiB x {iters}):\n\n", bytes >> 20);
        body += &table(&["engine", "SMs", "GB/s per rank", "slowest"], &ring);
        body += "\nFlag round trip (st.release.sys / ld.acquire.sys), rank 0 and each peer:\n\n";
        body += &table(&["pair", "round trip (us)"], &rtts.iter().map(|(p, v)| vec![format!("0 <-> {p}"), format!("{v:.2}")]).collect::<Vec<_>>());
        if g.gpu_sharers() > 1 {
            body += &format!(
                "\nShared GPU: the store figures above are copies within one GPU and mean nothing. The flag round trip is between \
                 processes sharing one GPU under CUDA MPS: **{max_rtt:.2} us**, close to NVLink's (2.5-2.7 us on 4 x H200), but not an NVLink figure.\n"
            );
        } else {
            body += &format!(
                "\nSummary: slowest pair, best register config: **{min_pair:.1} GB/s** (target >= 330); slowest flag round trip: **{max_rtt:.2} us** (target <= 3).\n"
            );
        }
        rep.section("P2P limits", body);
    }
    Ok(())
}
