//! NVSHMEM on a moe-ep group (feature `nvshmem`): NVSHMEM bootstrapped by unique id over the
//! group's exchange (or the process's own NVSHMEM reused), the probe kernels of `cargo xtask
//! build-ptx --nvshmem` (Rust kernels linked with NVSHMEM 3.4.5's device bitcode, loaded as the
//! sm_90 cubin) bound to it; then, each checked:
//! - `nvshmem_ptr` to every other PE (direct loads and stores within a node);
//! - a put-with-signal round trip between ranks 0 and 1, the payload checked at the end;
//! - every rank putting a buffer to the next at once, the whole received buffer compared;
//! - low-latency calls on a buffer in NVSHMEM's symmetric memory (`LlBuffer::with_nvshmem`)
//!   and on one in moe-ep's IPC heap, with the same inputs: BF16 and FP8 dispatch, per-expert
//!   and pre-reduced combine of rows in and outside the heap, hook mode; received rows and
//!   combined rows against the inputs and the CPU reference, and the two buffers against each
//!   other, byte for byte. With `MOE_EP_NVSHMEM_PUT=all` the NVSHMEM buffer reaches every other
//!   PE through NVSHMEM calls (the put path a PE on another node takes), not by direct stores.
//!
//! ```sh
//! cargo xtask build-ptx --nvshmem
//! cargo build --release --features nvshmem,testing --example nvshmem_probe
//! export MOE_EP_SECRET=$(openssl rand -hex 16) NVSHMEM_HOST_LIB=/path/to/libnvshmem_host.so.3
//! torchrun --nproc-per-node 2 --no-python target/release/examples/nvshmem_probe target/ptx/moe_ep_nvshmem.cubin
//! ```
//! (`NVSHMEM_HOST_LIB`: NVSHMEM 3.4.5 or a newer 3.x; its directory must also be on
//! `LD_LIBRARY_PATH` for NVSHMEM's bootstrap plugin.) `NVSHMEM_PROBE_ITERS` (default 20000)
//! round trips per trial and `NVSHMEM_PROBE_MIB` (default 256) MiB per put keep it short where
//! several PEs share one GPU (NVSHMEM's limited multi-process mode: the processes time-slice, so
//! no figure from such a run says anything about a link). `NVSHMEM_PROBE_NODE_SIZE=N` makes every
//! N ranks stand for one node (`MOE_EP_NODE`): the group then spans nodes, a low-latency buffer
//! in moe-ep's IPC heap must be refused, and the NVSHMEM buffer is checked on its own.

use cudarc::driver::sys;
use half::bf16;
use moe_ep::ll::{CombineArgs, CombineInput, CombineMode, DispatchArgs, LlBuffer, LlConfig, Payload};
use moe_ep::nvshmem::{Nvshmem, NvshmemPingPongParams, NvshmemPutParams};
use moe_ep::reference::{LlWorld, Rng, Routing, gen_bf16, gen_routing};
use moe_ep::{Group, GroupConfig, TopkIdx};
use std::sync::Arc;

fn env_or(name: &str, default: usize) -> Result<usize, Box<dyn std::error::Error>> {
    match std::env::var(name) {
        Ok(v) => Ok(v.parse().map_err(|_| format!("{name}={v:?} is not a number"))?),
        Err(_) => Ok(default),
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: nvshmem_probe <moe_ep_nvshmem.cubin or .ptx>")?;
    let image = std::fs::read(&path)?;
    let iters = env_or("NVSHMEM_PROBE_ITERS", 20000)? as u32;
    let mib = env_or("NVSHMEM_PROBE_MIB", 256)?;
    if std::env::var_os("NVSHMEM_PROBE_NODE_SIZE").is_some() {
        let (n, rank) = (env_or("NVSHMEM_PROBE_NODE_SIZE", 1)?.max(1), env_or("RANK", 0)?);
        // SAFETY: the first thing the process does: no other thread exists yet to read the
        // environment.
        unsafe { std::env::set_var(moe_ep::NODE_ENV, format!("probe-node-{}", rank / n)) };
    }
    let g = Group::from_env(GroupConfig::default())?;
    let (me, world, name) = (g.rank(), g.world(), g.device_name().to_string());
    let shared =
        if g.gpu_sharers() > 1 { format!(", {} PEs sharing this GPU: no figure below is a link figure", g.gpu_sharers()) } else { String::new() };
    let t0 = std::time::Instant::now();
    let nv = Arc::new(Nvshmem::init(&g, Some(&image))?);
    let (ma, mi, pa) = nv.version();
    println!(
        "rank {me} of {world} ({name}{shared}): NVSHMEM {ma}.{mi}.{pa} host library, {} in {:.0} ms, init status {} ({}), module {path} bound",
        if nv.owns_init() { "initialised by unique id over the group's exchange" } else { "reused (initialised before)" },
        t0.elapsed().as_secs_f64() * 1e3,
        nv.init_status(),
        match nv.init_status() {
            3 => "limited multi-process-per-GPU mode",
            4 => "full multi-process-per-GPU mode",
            _ => "one process per GPU",
        }
    );
    let s = g.stream().clone();

    let data = nv.malloc(16)?;
    let direct: Vec<String> = (0..world)
        .filter(|&pe| pe != me)
        .map(|pe| Ok(format!("PE {pe}: {}", if nv.direct_ptr(data.device_addr(), pe)?.is_some() { "direct" } else { "none" })))
        .collect::<moe_ep::Result<_>>()?;
    println!("rank {me}: nvshmem_ptr to the other PEs: {}", direct.join(", "));

    // Round trips between ranks 0 and 1; the payload (this rank's first word) must land in the
    // peer's second.
    let word = 0x5eed_0000_0000_0000u64 | me as u64;
    data.write(&s, &[word, 0])?;
    let elapsed = s.alloc_zeros::<u64>(1)?;
    let mut rtts = Vec::new();
    for _ in 0..3 {
        // Each trial counts its signal from zero: a fresh (zeroed) symmetric word.
        let sig_t = nv.malloc(8)?;
        nv.barrier_all()?;
        if me < 2 && world >= 2 {
            let p = NvshmemPingPongParams {
                data: data.device_addr(),
                signal: sig_t.device_addr(),
                peer: 1 - me as i32,
                initiator: (me == 0) as u32,
                iters,
                _pad: 0,
                elapsed_ns: moe_ep::DeviceArg::device_addr(&elapsed),
            };
            nv.launch_ping_pong(&s, &p)?;
        }
        nv.barrier_all()?;
        if me == 0 {
            rtts.push(s.clone_dtoh(&elapsed)?[0] as f64 / iters as f64 / 1e3);
        }
    }
    if me < 2 && world >= 2 {
        let got: Vec<u64> = data.to_vec(&s)?;
        let want = 0x5eed_0000_0000_0000u64 | (1 - me) as u64;
        if got[1] != want {
            return Err(format!("rank {me}: the round trips' payload is {:#x}, expected {want:#x} from rank {}", got[1], 1 - me).into());
        }
    }
    if me == 0 {
        rtts.sort_by(f64::total_cmp);
        println!(
            "rank 0 of {world} ({name}): put-with-signal round trip rank 0 <-> rank 1: {:.2} us (median of 3 trials of {iters}); payload checked",
            rtts[1]
        );
    }

    // Every rank puts `mib` MiB to the next at once; the whole received buffer is compared.
    let bytes = mib << 20;
    let reps = 10u32;
    let (src, dst) = (nv.malloc(bytes)?, nv.malloc(bytes)?);
    let pattern = |r: usize| 0x0100_0001u32.wrapping_mul(r as u32 + 1);
    src.fill_u32(&s, pattern(me))?;
    let ctx = g.context();
    let prev = (me + world - 1) % world;
    for blocks in [24u32, 132] {
        nv.barrier_all()?;
        let (a, b) = (ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?);
        a.record(&s)?;
        let p =
            NvshmemPutParams { src: src.device_addr(), dst: dst.device_addr(), bytes: bytes as u64, peer: ((me + 1) % world) as i32, iters: reps };
        nv.launch_put(&s, blocks, 256, &p)?;
        b.record(&s)?;
        b.synchronize()?;
        let ms = a.elapsed_ms(&b)? as f64;
        nv.barrier_all()?;
        let got: Vec<u32> = dst.to_vec(&s)?;
        let bad = got.iter().filter(|&&v| v != pattern(prev)).count();
        if bad != 0 {
            return Err(format!("rank {me}: {bad} of {} words from rank {prev} differ ({blocks} blocks)", got.len()).into());
        }
        println!(
            "rank {me} of {world} ({name}{shared}): put to rank {}, every rank at once, {blocks} blocks x 256 threads: {:.1} GB/s ({mib} MiB x {reps}); all {} words received from rank {prev} checked",
            (me + 1) % world,
            bytes as f64 * reps as f64 / ms / 1e6,
            got.len()
        );
    }
    drop((src, dst, data));
    // Said at once: an error dropped with NVSHMEM still initialised may end the process in
    // NVSHMEM's teardown before `main` prints it.
    low_latency_on_both_heaps(&g, &nv).inspect_err(|e| eprintln!("nvshmem_probe: rank {me}: {e}"))?;
    g.check()?;
    nv.finalize()?;
    println!("rank {me}: NVSHMEM finalised");
    Ok(())
}

/// Low-latency calls on a buffer in NVSHMEM's memory and on one in the IPC heap, with the same
/// inputs, each checked: on the NVSHMEM buffer every send path of the kernels runs (with
/// `MOE_EP_NVSHMEM_PUT=all`, the put path: NVSHMEM calls to every other PE, which the put ranks
/// must then show).
/// 1. BF16 dispatch: every received row against the inputs; per-expert combine of the received
///    rows where they lie (in the heap: sent from there) against the CPU reference;
/// 2. BF16 dispatch, per-expert combine of a copy outside the heap (staged before it is sent);
/// 3. BF16 dispatch, pre-reduced combine of that copy (staged sums);
/// 4. FP8 dispatch (rows and scales);
/// 5. both in hook mode (the receive halves launched apart).
///
/// Each step has inputs of its own (so a write that never lands cannot pass on the previous
/// step's rows). Identity experts: the combine's input is the received rows. The two buffers'
/// received rows (with their scales, each expert's rows ordered by source and token: the receive
/// half places them in arrival order), counts and combined rows must be equal byte for byte.
fn low_latency_on_both_heaps(g: &Group, nv: &Arc<Nvshmem>) -> Result<(), Box<dyn std::error::Error>> {
    let (me, world, name) = (g.rank(), g.world(), g.device_name().to_string());
    let (hd, k, t, e) = (1024, 4, 32, 8 * world);
    let epr = e / world;
    let s = g.stream().clone();
    let cases = (1..=5).map(|step| Case::new(&s, me, world, (hd, k, t, e), step)).collect::<Result<Vec<_>, _>>()?;
    let cfg = LlConfig::new(e, hd, k, t);
    let poisoned = || s.clone_htod(&vec![bf16::from_bits(0xFFFF); t * hd]);
    fn bf16_args(c: &Case, hook: bool) -> DispatchArgs<'_> {
        DispatchArgs { topk_weights: Some(&c.w), payload: Payload::Bf16, hook, ..DispatchArgs::fp8(&c.x, TopkIdx::I64(&c.idx)) }
    }
    let check_out = |label: &str, step: &str, out: &cudarc::driver::CudaSlice<bf16>, want: &[u16]| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let got: Vec<u16> = bytemuck::cast_slice(&s.clone_dtoh(out)?).to_vec();
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        if bad != 0 {
            return Err(format!("rank {me} ({label}, {step}): {bad} of {} combined values differ from the CPU reference", want.len()).into());
        }
        Ok(bytemuck::cast_slice(&got).to_vec())
    };
    // Every local expert's received BF16 rows (sets by source and token) and counts against
    // the case's inputs; returns the rows by source.
    let check_rows = |label: &str, step: &str, c: &Case, count: &[i32], meta: &[u32], rows: &[u16]| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let per = rows.len() / epr / hd;
        for ex in 0..epr {
            let n = count[ex] as usize;
            if n != c.want[ex].len() {
                return Err(format!("rank {me} ({label}, {step}): local expert {ex} received {n} rows, expected {}", c.want[ex].len()).into());
            }
            for slot in 0..n {
                let m = meta[ex * per + slot];
                let key = ((m >> 24) as usize, (m & 0xffff) as usize);
                let row = &rows[(ex * per + slot) * hd..(ex * per + slot + 1) * hd];
                if c.want[ex].get(&key).map(Vec::as_slice) != Some(row) {
                    return Err(format!(
                        "rank {me} ({label}, {step}): local expert {ex} slot {slot}: row from {key:?} differs or was not routed here"
                    )
                    .into());
                }
            }
        }
        Ok(by_source(count, meta, per, bytemuck::cast_slice(rows), 2 * hd, &[], 0))
    };
    let forced = std::env::var("MOE_EP_NVSHMEM_PUT").is_ok_and(|v| v == "all");
    let mut evidence: Vec<Vec<(&str, Vec<u8>)>> = Vec::new();
    let mut put_ranks = Vec::new();
    let mut buffers = vec![("NVSHMEM", LlBuffer::with_nvshmem(g, nv, cfg)?)];
    // Across nodes the IPC heap cannot be made (on any rank), and says so.
    if g.spans_nodes() {
        match LlBuffer::new(g, cfg) {
            Err(e @ moe_ep::Error::InvalidArgument { .. }) if e.to_string().contains("with_nvshmem") => {}
            other => {
                return Err(format!("rank {me}: ranks on nodes {:?}: expected the IPC buffer refused, got {:?}", g.nodes(), other.map(drop)).into());
            }
        }
    } else {
        buffers.push(("IPC", LlBuffer::new(g, cfg)?));
    }
    for (label, mut buf) in buffers {
        let want: Vec<usize> = if forced && label == "NVSHMEM" { (0..world).filter(|&r| r != me).collect() } else { vec![] };
        if buf.put_ranks() != want {
            return Err(format!("rank {me} ({label}): put ranks {:?}, expected {want:?}", buf.put_ranks()).into());
        }
        put_ranks.push(buf.put_ranks().to_vec());
        let mut ev: Vec<(&str, Vec<u8>)> = Vec::new();
        // 1. received rows checked, combined from where they lie.
        let c = &cases[0];
        let (h, _) = buf.dispatch(&s, &bf16_args(c, false))?;
        let rows = buf.recv_x_bf16(&h)?;
        let out = poisoned()?;
        let cargs = CombineArgs {
            x: CombineInput::Tensor(&rows),
            topk_idx: TopkIdx::I64(&c.idx),
            topk_weights: Some(&c.w),
            out: &out,
            mode: CombineMode::PerExpert,
            hook: false,
        };
        buf.combine(&s, &h, &cargs)?;
        buf.check()?;
        let count = buf.recv_count(&h)?.to_vec(&s)?;
        let meta = buf.recv_src_info(&h)?.to_vec(&s)?;
        let got_rows: Vec<u16> = bytemuck::cast_slice(&rows.to_vec(&s)?).to_vec();
        ev.push(("BF16 counts", bytemuck::cast_slice(&count).to_vec()));
        ev.push(("BF16 rows by source", check_rows(label, "BF16 dispatch", c, &count, &meta, &got_rows)?));
        ev.push(("per-expert combine of the received rows", check_out(label, "per-expert combine of the received rows", &out, &c.want_out)?));
        // 2. and 3. combines of rows outside the heap: each dispatch's received rows copied out
        // (rows land in arrival order, so every dispatch's copy is its own).
        for (c, mode) in [(&cases[1], CombineMode::PerExpert), (&cases[2], CombineMode::PreReduced)] {
            let (step, want) = match mode {
                CombineMode::PerExpert => ("per-expert combine of a copy outside the heap", &c.want_out),
                CombineMode::PreReduced => ("pre-reduced combine of a copy outside the heap", &c.want_reduced),
            };
            let (h, _) = buf.dispatch(&s, &bf16_args(c, false))?;
            let y = s.clone_htod(&buf.recv_x_bf16(&h)?.to_vec(&s)?)?;
            let out = poisoned()?;
            // A pre-reduced combine takes the weights its dispatch carried.
            let weights: Option<&dyn moe_ep::DeviceArg<f32>> = match mode {
                CombineMode::PerExpert => Some(&c.w),
                CombineMode::PreReduced => None,
            };
            let a = CombineArgs { x: CombineInput::Tensor(&y), topk_idx: TopkIdx::I64(&c.idx), topk_weights: weights, out: &out, mode, hook: false };
            buf.combine(&s, &h, &a)?;
            buf.check()?;
            ev.push((step, check_out(label, step, &out, want)?));
        }
        // 4. FP8 rows and scales (compared with the other buffer's below).
        let c = &cases[3];
        let (h, _) = buf.dispatch(&s, &DispatchArgs { topk_weights: Some(&c.w), ..DispatchArgs::fp8(&c.x, TopkIdx::I64(&c.idx)) })?;
        buf.check()?;
        let (c8, m8) = (buf.recv_count(&h)?.to_vec(&s)?, buf.recv_src_info(&h)?.to_vec(&s)?);
        let (r8, s8) = (buf.recv_x_fp8(&h)?.to_vec(&s)?, buf.recv_scales(&h)?.to_vec(&s)?);
        let per = r8.len() / epr / hd;
        ev.push(("FP8 counts", bytemuck::cast_slice(&c8).to_vec()));
        ev.push(("FP8 rows and scales by source", by_source(&c8, &m8, per, &r8, hd, bytemuck::cast_slice(&s8), 4 * (hd / 128))));
        // 5. hook mode: the send halves, then the receive halves.
        let c = &cases[4];
        let (mut h, _) = buf.dispatch(&s, &bf16_args(c, true))?;
        buf.dispatch_recv(&s, &mut h, None)?;
        let (ch, mh) = (buf.recv_count(&h)?.to_vec(&s)?, buf.recv_src_info(&h)?.to_vec(&s)?);
        let hook_rows = buf.recv_x_bf16(&h)?.to_vec(&s)?;
        ev.push(("hook-mode rows by source", check_rows(label, "hook-mode dispatch", c, &ch, &mh, bytemuck::cast_slice(&hook_rows))?));
        let y = s.clone_htod(&hook_rows)?;
        let out = poisoned()?;
        let a = CombineArgs {
            x: CombineInput::Tensor(&y),
            topk_idx: TopkIdx::I64(&c.idx),
            topk_weights: Some(&c.w),
            out: &out,
            mode: CombineMode::PerExpert,
            hook: true,
        };
        let (pending, _) = buf.combine(&s, &h, &a)?;
        let mut pending = pending.ok_or("a hook-mode combine returned no pending receive half")?;
        buf.combine_recv(&s, &mut pending)?;
        buf.check()?;
        ev.push(("hook-mode per-expert combine", check_out(label, "hook-mode per-expert combine", &out, &c.want_out)?));
        buf.destroy()?;
        evidence.push(ev);
    }
    if g.spans_nodes() {
        println!(
            "rank {me} of {world} ({name}): ranks on nodes {:?}; low-latency calls on NVSHMEM's symmetric memory (put ranks {:?}: {}): every received row ({} rows in step 1), both combines of rows in and outside the heap and hook mode match the inputs and the CPU reference; the IPC heap was refused (the ranks span nodes)",
            g.nodes(),
            put_ranks[0],
            if put_ranks[0].is_empty() { "every PE by direct stores" } else { "NVSHMEM calls to those PEs" },
            cases[0].want.iter().map(|m| m.len()).sum::<usize>(),
        );
        return Ok(());
    }
    for ((what, a), (_, b)) in evidence[0].iter().zip(&evidence[1]) {
        if a != b {
            let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
            return Err(format!("rank {me}: {what} differ between the NVSHMEM and the IPC buffer (first at byte {at} of {})", a.len()).into());
        }
    }
    println!(
        "rank {me} of {world} ({name}): low-latency calls on NVSHMEM's symmetric memory (put ranks {:?}: {}) and on the IPC heap: every received row ({} rows in step 1), both combines of rows in and outside the heap, FP8 rows and scales and hook mode match the inputs and the CPU reference, and each other byte for byte ({})",
        put_ranks[0],
        if put_ranks[0].is_empty() { "every PE by direct stores" } else { "NVSHMEM calls to those PEs" },
        cases[0].want.iter().map(|m| m.len()).sum::<usize>(),
        evidence[0].iter().map(|(w, b)| format!("{w}: {} B", b.len())).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// One step's inputs (every rank's, from a seed of the rank and the step) and what this rank
/// must get from them.
struct Case {
    x: cudarc::driver::CudaSlice<bf16>,
    idx: cudarc::driver::CudaSlice<i64>,
    w: cudarc::driver::CudaSlice<f32>,
    /// Per local expert: (source, token) -> the row it must receive.
    want: Vec<std::collections::BTreeMap<(usize, usize), Vec<u16>>>,
    /// The per-expert and pre-reduced combines of identity experts.
    want_out: Vec<u16>,
    want_reduced: Vec<u16>,
}

impl Case {
    fn new(
        s: &Arc<cudarc::driver::CudaStream>,
        me: usize,
        world: usize,
        (hd, k, t, e): (usize, usize, usize, usize),
        step: u64,
    ) -> Result<Case, Box<dyn std::error::Error>> {
        let epr = e / world;
        let inputs: Vec<(Vec<u16>, Vec<i64>, Vec<f32>)> = (0..world)
            .map(|r| {
                let mut rng = Rng::new(0x5eed ^ ((r as u64) << 8) ^ (step << 32));
                let (idx, w) = gen_routing(&mut rng, t, k, e, world, Routing::Scores, 0.1);
                (gen_bf16(&mut rng, t * hd, 1.0), idx, w)
            })
            .collect();
        let mut want: Vec<std::collections::BTreeMap<(usize, usize), Vec<u16>>> = vec![Default::default(); epr];
        for (src, (xs, is, _)) in inputs.iter().enumerate() {
            for tok in 0..t {
                for &ex in &is[tok * k..(tok + 1) * k] {
                    if ex >= 0 && ex as usize / epr == me {
                        want[ex as usize % epr].insert((src, tok), xs[tok * hd..(tok + 1) * hd].to_vec());
                    }
                }
            }
        }
        let (x_h, idx_h, w_h) = &inputs[me];
        let mut lw =
            LlWorld { num_experts: e, hidden: hd, k, x: vec![vec![]; world], topk_idx: vec![vec![]; world], topk_weights: vec![vec![]; world] };
        lw.x[me] = x_h.clone();
        lw.topk_idx[me] = idx_h.clone();
        lw.topk_weights[me] = w_h.clone();
        let identity = |tok: usize, _| x_h[tok * hd..(tok + 1) * hd].to_vec();
        Ok(Case {
            x: s.clone_htod(bytemuck::cast_slice::<u16, bf16>(x_h))?,
            idx: s.clone_htod(idx_h)?,
            w: s.clone_htod(w_h)?,
            want,
            want_out: lw.combine(me, &identity),
            want_reduced: lw.combine_pre_reduced(me, &identity),
        })
    }
}

/// Each local expert's received rows (`row` bytes each, and `scale` bytes of scales each, from
/// row-major `scales`), ordered by (source, token) from the source info `meta`: the receive
/// half places rows in arrival order, so two runs compare equal only in this form.
fn by_source(count: &[i32], meta: &[u32], per: usize, rows: &[u8], row: usize, scales: &[u8], scale: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (ex, &c) in count.iter().enumerate() {
        let mut keyed: Vec<(u32, usize)> = (0..c as usize).map(|slot| (meta[ex * per + slot], ex * per + slot)).collect();
        keyed.sort_unstable();
        for (key, at) in keyed {
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&rows[at * row..(at + 1) * row]);
            if scale != 0 {
                out.extend_from_slice(&scales[at * scale..(at + 1) * scale]);
            }
        }
    }
    out
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nvshmem_probe: {e}");
        std::process::exit(1);
    }
}
