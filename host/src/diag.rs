//! Foundation checks and probes: heap pattern round trips, the deadline test, the device-layer
//! self-test, P2P store bandwidth and flag round-trip latency. Tests and the benchmark call
//! these; they are public so a user can run the same checks on a new machine.

use crate::driver::{self, DeviceAlloc};
use crate::error::{DriverContext, Error, Result};
use crate::group::{Group, Kernel};
use cudarc::driver::CudaStream;
use moe_ep_kernels::abi::*;
use std::time::Duration;

/// Collective: every rank writes a rank-tagged pattern (`pattern_word(seed, rank, i)`) of
/// `slot_bytes` into slot `rank` of every rank's region through peer pointers, signals, and
/// every rank checks all it received (its region is poisoned first). Returns, per source
/// rank, the number of 32-bit words that differ.
pub fn heap_pattern_roundtrip(g: &Group, slot_bytes: u64, seed: u32, runs: u32) -> Result<Vec<u64>> {
    let trace = |what: &str| {
        if std::env::var_os("MOE_EP_TRACE").is_some() {
            eprintln!("[rank {}] heap pattern: {what}", g.rank());
        }
    };
    let world = g.world() as u64;
    let slot_bytes = slot_bytes / 4 * 4;
    trace("allocating");
    let heap = g.new_heap(CONTROL_BYTES + world * slot_bytes, "the heap pattern test")?;
    let mism = DeviceAlloc::zeroed(g.context(), 4 * g.world())?;
    trace("allocated");
    let s = g.stream();
    let blocks = 2 * g.sm_count().max(1);
    for run in 1..=runs {
        // Poison this rank's region, then make sure every rank has poisoned before anyone writes.
        // SAFETY: the region lies inside the heap; nothing else uses it.
        unsafe { driver::memset_d8_async(heap.local_ptr() + CONTROL_BYTES, 0xAB, (world * slot_bytes) as usize, s) }
            .during("cuMemsetD8Async", || "poisoning the pattern region".into())?;
        g.launch_barrier(s, 1)?;
        let p = PatternParams {
            wait: g.wait_ctx(),
            peers: heap.peers("the heap pattern test")?,
            region_off: CONTROL_BYTES,
            slot_bytes,
            seed: seed.wrapping_add(run),
            signal: run * blocks,
            mismatches: mism.ptr(),
        };
        g.launch(Kernel::HeapPatternWrite, blocks, 512, 0, s, &p)?;
        g.launch(Kernel::HeapPatternCheck, blocks, 512, 0, s, &p)?;
        trace(&format!("run {run} launched"));
        g.check()?;
        trace(&format!("run {run} done"));
    }
    let mut out = vec![0u32; g.world()];
    // SAFETY: `mism` holds `world` u32.
    unsafe { driver::copy_to_host(mism.ptr(), &mut out, s) }.during("cuMemcpyDtoH", || "reading mismatch counts".into())?;
    g.host_barrier()?;
    Ok(out.into_iter().map(u64::from).collect())
}

/// Queues one cross-rank barrier on `stream` that opens only after it has waited `hold` on
/// the GPU. A benchmark queues the work it times behind it within `hold` (a low-latency call
/// takes a few microseconds of host time), so the timing starts when every rank's work is
/// already queued, and leaves out the host's launch cost, as a CUDA graph or a busy stream
/// does in serving.
pub fn launch_held_barrier(g: &Group, stream: &CudaStream, hold: Duration) -> Result<()> {
    let ns =
        u32::try_from(hold.as_nanos()).map_err(|_| Error::invalid("hold", format!("{hold:?} is above the kernel's limit of {} ns", u32::MAX)))?;
    g.launch_held_barrier(stream, ns)
}

/// Queues `hold` of GPU time on `stream` that waits for no other rank (a busy stream, as work
/// queued ahead of an operation makes it in serving).
pub fn launch_gpu_sleep(g: &Group, stream: &CudaStream, hold: Duration) -> Result<()> {
    let ns =
        u32::try_from(hold.as_nanos()).map_err(|_| Error::invalid("hold", format!("{hold:?} is above the kernel's limit of {} ns", u32::MAX)))?;
    g.launch_gpu_sleep(stream, ns)
}

/// Launches `launches` barrier kernels of `iters_per_launch` barriers each and checks them.
pub fn barrier_loop(g: &Group, launches: u32, iters_per_launch: u32) -> Result<()> {
    for _ in 0..launches {
        g.launch_barrier(g.stream(), iters_per_launch)?;
    }
    g.check()
}

/// Runs a kernel that waits for a flag `peer` never writes, with deadline `timeout`; returns
/// what the host got (expected: `Err(Error::Timeout { .. })` naming `peer`).
pub fn wait_for_silent_peer(g: &Group, peer: usize, timeout: Duration) -> Result<()> {
    check_rank(g, "peer", peer, true)?;
    let p = WaitTestParams { wait: g.wait_ctx_with(timeout), peers: g.control_peers("the deadline test")?, peer: peer as u32, value: u32::MAX / 2 };
    g.launch(Kernel::WaitForever, 1, 32, 0, g.stream(), &p)?;
    g.check()
}

/// What the device-layer self-test produced.
pub struct SelftestOutput {
    /// Output words (indices in [`moe_ep_kernels::abi::selftest_out`]).
    pub words: Vec<u32>,
    /// FP8 e4m3 of each conversion input.
    pub fp8: Vec<u8>,
    /// bf16 bits of each conversion input.
    pub bf16: Vec<u16>,
    /// Threads and blocks the test ran with.
    pub threads: u32,
}

/// Runs `ptx_selftest` (one block of 64 threads) on conversion inputs `cvt_in`
/// ([`SELFTEST_CVT_INPUTS`] values).
pub fn ptx_selftest(g: &Group, cvt_in: &[f32]) -> Result<SelftestOutput> {
    assert_eq!(cvt_in.len(), SELFTEST_CVT_INPUTS);
    let ctx = g.context();
    let s = g.stream();
    let scratch = DeviceAlloc::zeroed(ctx, SELFTEST_SCRATCH_WORDS * 4)?;
    let fill: Vec<u32> = (0..256u32).map(|i| i.wrapping_mul(0x9E37_79B9) ^ 0x5555).collect();
    let out = DeviceAlloc::zeroed(ctx, SELFTEST_OUT_WORDS * 4)?;
    let inp = DeviceAlloc::zeroed(ctx, SELFTEST_CVT_INPUTS * 4)?;
    let fp8 = DeviceAlloc::zeroed(ctx, SELFTEST_CVT_INPUTS)?;
    let bf16 = DeviceAlloc::zeroed(ctx, SELFTEST_CVT_INPUTS * 2)?;
    // SAFETY: destinations were sized above.
    unsafe {
        driver::copy_to_device(&fill, scratch.ptr() + 64 * 4, s).during("cuMemcpyHtoD", || "self-test scratch".into())?;
        driver::copy_to_device(cvt_in, inp.ptr(), s).during("cuMemcpyHtoD", || "self-test inputs".into())?;
    }
    // The outputs start zeroed; if they do not, allocation or zeroing is broken, not a wrapper.
    let mut before = vec![0u32; SELFTEST_OUT_WORDS];
    // SAFETY: `out` holds SELFTEST_OUT_WORDS words.
    unsafe { driver::copy_to_host(out.ptr(), &mut before, s) }.during("cuMemcpyDtoH", || "self-test outputs before the run".into())?;
    if let Some(i) = before.iter().position(|&w| w != 0) {
        return Err(crate::Error::Internal {
            reason: format!("self-test output word {i} is {:#x} before the kernel ran (expected a zeroed allocation)", before[i]),
        });
    }
    let p = SelftestParams { scratch: scratch.ptr(), out: out.ptr(), cvt_in: inp.ptr(), cvt_fp8: fp8.ptr(), cvt_bf16: bf16.ptr() };
    let threads = 64;
    g.launch(Kernel::PtxSelftest, 1, threads, 8192, s, &p)?;
    g.check()?;
    let mut r = SelftestOutput { words: vec![0; SELFTEST_OUT_WORDS], fp8: vec![0; SELFTEST_CVT_INPUTS], bf16: vec![0; SELFTEST_CVT_INPUTS], threads };
    // SAFETY: sizes as allocated.
    unsafe {
        driver::copy_to_host(out.ptr(), &mut r.words, s).during("cuMemcpyDtoH", || "self-test outputs".into())?;
        driver::copy_to_host(fp8.ptr(), &mut r.fp8, s).during("cuMemcpyDtoH", || "self-test fp8".into())?;
        driver::copy_to_host(bf16.ptr(), &mut r.bf16, s).during("cuMemcpyDtoH", || "self-test bf16".into())?;
    }
    Ok(r)
}

/// How a P2P copy is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyEngine {
    /// 16-byte stores from registers.
    Registers,
    /// `cp.async.bulk` through shared memory.
    Bulk,
}

/// A scratch heap for the bandwidth probes: `bytes` of source and `bytes` of destination per
/// rank.
pub struct P2pProbe {
    heap: crate::heap::SymmetricHeap,
    src: DeviceAlloc,
    bytes: u64,
}

impl P2pProbe {
    /// Collective.
    pub fn new(g: &Group, bytes: u64) -> Result<Self> {
        let bytes = bytes / 16 * 16;
        let heap = g.new_heap(CONTROL_BYTES + bytes, "the copy probe")?;
        let src = DeviceAlloc::zeroed(g.context(), bytes as usize)?;
        // SAFETY: `src` holds `bytes` bytes; a non-zero pattern keeps the copy honest.
        unsafe { driver::memset_d8_async(src.ptr(), 0x5a, bytes as usize, g.stream()) }
            .during("cuMemsetD8Async", || "filling the probe source".into())?;
        Ok(P2pProbe { heap, src, bytes })
    }

    /// Copies the source into `dst_rank`'s destination `iters` times with `blocks` blocks on
    /// `stream` and returns GB/s (not collective: only the sending rank calls it).
    pub fn copy_bandwidth(&self, g: &Group, stream: &CudaStream, dst_rank: usize, blocks: u32, engine: CopyEngine, iters: u32) -> Result<f64> {
        check_rank(g, "dst_rank", dst_rank, true)?;
        if blocks == 0 || blocks > g.sm_count().max(1) {
            return Err(Error::invalid("blocks", format!("{blocks} is outside 1..={}", g.sm_count().max(1))));
        }
        let p = P2pCopyParams {
            src: self.src.ptr(),
            dst: self.heap.base(dst_rank) + CONTROL_BYTES,
            bytes: self.bytes,
            iters,
            use_bulk: (engine == CopyEngine::Bulk) as u32,
        };
        let (threads, smem) = match engine {
            CopyEngine::Registers => (1024, 0),
            CopyEngine::Bulk => (32, BULK_STAGES * BULK_CHUNK + 8 * BULK_STAGES),
        };
        // Warm-up, then timed.
        let warm = P2pCopyParams { iters: 1, ..p };
        g.launch(Kernel::P2pCopy, blocks, threads, smem, stream, &warm)?;
        let ms = crate::timing::time_ms(stream, || g.launch(Kernel::P2pCopy, blocks, threads, smem, stream, &p))?;
        g.check()?;
        Ok(self.bytes as f64 * iters as f64 / (ms * 1e-3) / 1e9)
    }
}

/// Flag round trips with `peer` (both ranks call it; `initiator` on exactly one). Returns the
/// mean round trip in microseconds on the initiator.
pub fn ping_pong(g: &Group, peer: usize, initiator: bool, iters: u32) -> Result<Option<f64>> {
    check_rank(g, "peer", peer, false)?;
    let s = g.stream();
    let elapsed = DeviceAlloc::zeroed(g.context(), 8)?;
    // Zero this rank's ping flags, and meet the peer so both start from zero.
    let peers = g.control_peers("the flag ping-pong")?;
    let me = peers.base[g.rank()] + std::mem::offset_of!(Control, ping_flags) as u64;
    // SAFETY: the flags lie in this rank's control block; no kernel uses them now.
    unsafe { driver::memset_d8_async(me, 0, 4 * MAX_RANKS, s) }.during("cuMemsetD8Async", || "zeroing ping flags".into())?;
    g.launch_barrier(s, 1)?;
    let p = PingPongParams { wait: g.wait_ctx(), peers, peer: peer as u32, initiator: initiator as u32, iters, _pad: 0, elapsed_ns: elapsed.ptr() };
    g.launch(Kernel::PingPong, 1, 32, 0, s, &p)?;
    g.check()?;
    if !initiator {
        return Ok(None);
    }
    let mut ns = [0u64];
    // SAFETY: `elapsed` holds one u64.
    unsafe { driver::copy_to_host(elapsed.ptr(), &mut ns, s) }.during("cuMemcpyDtoH", || "reading ping-pong time".into())?;
    Ok(Some(ns[0] as f64 / iters as f64 / 1e3))
}

/// `r` must be a rank of the group (and, unless `self_ok`, another rank than this one).
fn check_rank(g: &Group, name: &'static str, r: usize, self_ok: bool) -> Result<()> {
    if r >= g.world() || (!self_ok && r == g.rank()) {
        let which = if self_ok { "a rank" } else { "another rank" };
        return Err(Error::invalid(name, format!("{r} is not {which} of this {}-rank group (this is rank {})", g.world(), g.rank())));
    }
    Ok(())
}
