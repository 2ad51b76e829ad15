//! Low-latency test cases: a scenario every rank rebuilds from a seed, run on the GPU and
//! compared whole with the CPU reference (the GPU tests and the soak share them).

use crate::*;
use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::CudaStream;
use half::bf16;
use moe_ep::ll::{CombineArgs, CombineInput, CombineMode, DispatchArgs, Handle, LlBuffer, LlConfig, Payload, ScaleFormat, ScaleLayout};
use moe_ep::reference::{LlRow, LlWorld, Rng, Routing, gen_bf16, gen_routing};
use moe_ep::{Group, TopkIdx};
use moe_ep_kernels::fp::{bf16_to_f32, f32_to_bf16};
use std::collections::HashMap;
use std::sync::Arc;

/// One test scenario (all ranks build the same one from the seed).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub hidden: usize,
    pub k: usize,
    pub experts: usize,
    pub max_tokens: usize,
    /// Tokens per rank (rank 1 gets `zero_rank` tokens when set).
    pub tokens: usize,
    pub routing: Routing,
    pub drop: f32,
    pub zero_rank: bool,
    pub payload: Payload,
    pub hook: bool,
    pub zero_copy: bool,
    pub mode: CombineMode,
    pub layout: ScaleLayout,
}

impl Case {
    pub fn base(hidden: usize, k: usize, experts: usize, tokens: usize) -> Self {
        Case {
            hidden,
            k,
            experts,
            max_tokens: tokens,
            tokens,
            routing: Routing::Scores,
            drop: 0.0,
            zero_rank: false,
            payload: Payload::Fp8(ScaleFormat::F32),
            hook: false,
            zero_copy: false,
            mode: CombineMode::PerExpert,
            layout: ScaleLayout::RowMajor,
        }
    }

    pub fn world(&self, world: usize, seed: u64) -> LlWorld {
        let mut w = LlWorld { num_experts: self.experts, hidden: self.hidden, k: self.k, x: vec![], topk_idx: vec![], topk_weights: vec![] };
        for r in 0..world {
            let mut rng = Rng::new(seed ^ (r as u64 + 7).wrapping_mul(0x51_7cc1_b727_220a));
            let n = if self.zero_rank && r == 1 { 0 } else { self.tokens };
            let (idx, wt) = gen_routing(&mut rng, n, self.k, self.experts, world, self.routing, self.drop);
            w.x.push(gen_bf16(&mut rng, n * self.hidden, 1.5));
            w.topk_idx.push(idx);
            w.topk_weights.push(wt);
        }
        w
    }
}

/// Expert `e`'s output for a token: the token times a per-expert factor, in bf16.
pub fn expert_row(x: &[u16], e: usize) -> Vec<u16> {
    let c = 1.0 + (e % 7) as f32 / 8.0;
    x.iter().map(|&v| f32_to_bf16(bf16_to_f32(v) * c)).collect()
}

/// Scales of packed row `j` of expert `e` as the reference lays them out (f32 bytes, or one
/// UE8M0 byte per group), read from a scale view in either layout.
fn row_scales(view: &[u8], e: usize, j: usize, groups: usize, rows: usize, ue8m0: bool, layout: ScaleLayout) -> Vec<u8> {
    let words = groups.div_ceil(4);
    (0..groups)
        .flat_map(|g| {
            let at = match (layout, ue8m0) {
                (ScaleLayout::RowMajor, false) => ((e * rows + j) * groups + g) * 4,
                (ScaleLayout::RowMajor, true) => (e * rows + j) * words * 4 + g,
                (ScaleLayout::ColumnMajor, false) => ((e * groups + g) * rows + j) * 4,
                (ScaleLayout::ColumnMajor, true) => ((e * words + g / 4) * rows + j) * 4 + g % 4,
            };
            if ue8m0 { view[at..at + 1].to_vec() } else { view[at..at + 4].to_vec() }
        })
        .collect()
}

/// Reads what `h` delivered and compares it with the reference as sets; returns the (source
/// rank, token, slot) of every received row, per local expert.
pub fn check_dispatch(
    g: &Group,
    buf: &LlBuffer,
    h: &Handle,
    w: &LlWorld,
    case: &Case,
    s: &Arc<CudaStream>,
) -> Result<Vec<Vec<(usize, usize, usize)>>> {
    let me = g.rank();
    let epr = case.experts / g.world();
    let rows_pe = g.world() * case.max_tokens;
    let hd = case.hidden;
    let fmt = match case.payload {
        Payload::Bf16 => None,
        Payload::Fp8(f) => Some(match f {
            ScaleFormat::F32 => moe_ep::abi::scale_fmt::F32,
            ScaleFormat::F32Pow2 => moe_ep::abi::scale_fmt::F32_POW2,
            ScaleFormat::Ue8m0 => moe_ep::abi::scale_fmt::UE8M0,
        }),
    };
    let want = w.dispatch(me, fmt);
    let counts = buf.recv_count(h)?.to_vec(s)?;
    let meta = buf.recv_src_info(h)?.to_vec(s)?;
    let (payload, row_bytes): (Vec<u8>, usize) = match case.payload {
        Payload::Bf16 => (bytemuck::cast_slice(&buf.recv_x_bf16(h)?.to_vec(s)?).to_vec(), 2 * hd),
        Payload::Fp8(_) => (buf.recv_x_fp8(h)?.to_vec(s)?, hd),
    };
    let cols = hd / 128;
    let scales: Vec<u8> = match case.payload {
        Payload::Bf16 => Vec::new(),
        Payload::Fp8(ScaleFormat::Ue8m0) => bytemuck::cast_slice(&buf.recv_scales_ue8m0(h)?.to_vec(s)?).to_vec(),
        Payload::Fp8(_) => bytemuck::cast_slice(&buf.recv_scales(h)?.to_vec(s)?).to_vec(),
    };
    let ue8m0 = case.payload == Payload::Fp8(ScaleFormat::Ue8m0);
    let scale_rows = if case.layout == ScaleLayout::ColumnMajor { buf.scale_rows() } else { rows_pe };
    let mut layout = Vec::new();
    for e in 0..epr {
        ensure!(counts[e] as usize == want[e].len(), "expert {e}: {} rows received, expected {}", counts[e], want[e].len());
        let mut expected: HashMap<(usize, usize, usize), &LlRow> = want[e].iter().map(|r| ((r.src_rank, r.src_token, r.slot), r)).collect();
        let mut rows = Vec::new();
        for j in 0..counts[e] as usize {
            let row = e * rows_pe + j;
            let m = meta[row];
            let key = ((m >> 24) as usize, (m & 0xffff) as usize, ((m >> 16) & 0xff) as usize);
            let Some(r) = expected.remove(&key) else { bail!("expert {e} row {j}: unexpected or duplicate source {key:?}") };
            compare(&format!("expert {e} row {j} {key:?} payload"), &payload[row * row_bytes..(row + 1) * row_bytes], &r.payload)?;
            if !scales.is_empty() {
                let got = row_scales(&scales, e, j, cols, scale_rows, ue8m0, case.layout);
                compare(&format!("expert {e} row {j} {key:?} scales"), &got, &r.scales)?;
            }
            rows.push(key);
        }
        ensure!(expected.is_empty(), "expert {e}: {} rows never arrived", expected.len());
        layout.push(rows);
    }
    Ok(layout)
}

/// Runs `case` on a new buffer sized for it.
pub fn run_case(g: &Group, seed: u64, case: Case) -> Result<()> {
    let experts = experts_for(g.world(), case.experts);
    let mut buf = LlBuffer::new(g, LlConfig::new(experts, case.hidden, case.k, case.max_tokens))?;
    run_case_on(g, &mut buf, seed, case)
}

/// Runs `case` on `buf` (built for the case's experts, hidden size, top-k and `max_tokens`):
/// two rounds (both buffer halves) of dispatch and combine, every output poisoned first and
/// compared whole with the reference, then the cumulative statistics.
pub fn run_case_on(g: &Group, buf: &mut LlBuffer, seed: u64, case: Case) -> Result<()> {
    let world = g.world();
    let case = Case { experts: experts_for(world, case.experts), ..case };
    let me = g.rank();
    let w = case.world(world, seed);
    let epr = case.experts / world;
    let (hd, k) = (case.hidden, case.k);
    let n = w.topk_idx[me].len() / k;
    let s = g.stream();
    let x = upload(s, bytemuck::cast_slice::<u16, bf16>(&w.x[me]))?;
    let idx = upload(s, &w.topk_idx[me])?;
    let wts = upload(s, &w.topk_weights[me])?;
    let stats = upload(s, &vec![0i32; epr])?;
    for round in 0..2 {
        // Two rounds: both buffer halves.
        buf.poison(s, 0xEE)?;
        let carry_weights = case.mode == CombineMode::PreReduced || round == 1;
        let args = DispatchArgs {
            x: &x,
            topk_idx: TopkIdx::I64(&idx),
            topk_weights: carry_weights.then_some(&wts as _),
            payload: case.payload,
            scale_layout: case.layout,
            stats: Some(&stats),
            hook: case.hook,
        };
        let (mut h, _) = buf.dispatch(s, &args)?;
        if case.hook {
            buf.dispatch_recv(s, &mut h, Some(&stats))?;
        }
        buf.check()?;
        let rows = check_dispatch(g, buf, &h, &w, &case, s).with_context(|| format!("dispatch round {round}"))?;
        // Expert outputs at the received rows.
        let rows_pe = world * case.max_tokens;
        let mut y = vec![0u16; epr * rows_pe * hd];
        for (e, list) in rows.iter().enumerate() {
            for (j, &(sr, t, _)) in list.iter().enumerate() {
                let row = e * rows_pe + j;
                let xr = &w.x[sr][t * hd..(t + 1) * hd];
                y[row * hd..(row + 1) * hd].copy_from_slice(&expert_row(xr, me * epr + e));
            }
        }
        let y_dev = upload(s, bytemuck::cast_slice::<u16, bf16>(&y))?;
        let input = if case.zero_copy {
            let view = buf.combine_input(&h)?;
            ensure!(view.len() == y.len());
            // SAFETY: the view spans `y.len()` bf16 of this rank's heap; the stream orders the
            // copy before the combine (this is what an expert GEMM writing there would do).
            unsafe { cudarc::driver::result::memcpy_htod_async(view.device_addr(), &y[..], s.cu_stream())? };
            s.synchronize()?;
            CombineInput::ZeroCopy
        } else {
            CombineInput::Tensor(&y_dev)
        };
        let out = poisoned(s, n * hd, bf16::from_bits(0xFFFF))?;
        let home_weights = (case.mode == CombineMode::PerExpert).then_some(&wts as _);
        let cargs = CombineArgs { x: input, topk_idx: TopkIdx::I64(&idx), topk_weights: home_weights, out: &out, mode: case.mode, hook: case.hook };
        let (pending, _) = buf.combine(s, &h, &cargs)?;
        if let Some(mut p) = pending {
            buf.combine_recv(s, &mut p)?;
        }
        buf.check()?;
        let got: Vec<u16> = bytemuck::cast_slice(&out.to_vec(s)?).to_vec();
        let idx_h = &w.topk_idx[me];
        let y_of = |t: usize, j: usize| expert_row(&w.x[me][t * hd..(t + 1) * hd], idx_h[t * k + j] as usize);
        let want = match case.mode {
            CombineMode::PerExpert => w.combine(me, &y_of),
            CombineMode::PreReduced => w.combine_pre_reduced(me, &y_of),
        };
        compare(&format!("round {round}: combined rows ({:?})", case.mode), &got, &want)?;
    }
    // Cumulative statistics: two rounds of counts.
    let counts: Vec<i32> = w.dispatch(me, None).iter().map(|v| 2 * v.len() as i32).collect();
    compare("per-expert statistics", &stats.to_vec(s)?, &counts)?;
    Ok(())
}
