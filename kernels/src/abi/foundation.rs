//! Parameter blocks of the foundation kernels (barrier, tests, probes, the device-layer self-test).

use crate::abi::{KernelParams, Peers, WaitCtx};
use bytemuck::{Pod, Zeroable};

/// `barrier` kernel: a cross-rank barrier, `iters` times in a row.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct BarrierParams {
    pub wait: WaitCtx,
    /// Device address of this rank's rank table ([`crate::abi::HeapTables::ranks`] of the
    /// heap whose epochs the barrier counts; no entry may carry [`crate::abi::RANK_PUT`]).
    pub ranks: u64,
    /// Heap offset of the barrier's slots ([`crate::abi::HeapTables::barrier`]).
    pub slots: u64,
    pub iters: u32,
    /// Nanoseconds the kernel waits (on the GPU's clock) before its first barrier; 0 for none.
    /// A benchmark holds the barrier this way so that the work it times is queued behind it
    /// before it opens: the timing then leaves out the host's launch cost.
    pub hold_ns: u32,
}

impl KernelParams for BarrierParams {
    const ENTRIES: &'static [&'static str] = &["barrier"];
}

/// `heap_pattern_write` / `heap_pattern_check`: every rank writes a rank-tagged pattern into
/// a region of every peer's heap, then signals; the check kernel verifies what arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct PatternParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    /// Heap offset of the region; slot `s` (bytes `[s * slot_bytes, (s + 1) * slot_bytes)`)
    /// is written by rank `s`.
    pub region_off: u64,
    pub slot_bytes: u64,
    /// Mixed into the pattern so every run writes fresh values.
    pub seed: u32,
    /// The check kernel waits until `test_flags[s]` of every source reaches this cumulative
    /// count of write blocks (runs so far times the write grid size).
    pub signal: u32,
    /// Device address of `u32` error counters (check kernel): `[world]` mismatches per source.
    pub mismatches: u64,
}

impl KernelParams for PatternParams {
    const ENTRIES: &'static [&'static str] = &["heap_pattern_write", "heap_pattern_check"];
}

/// Word `i` of the pattern rank `src` writes in run `seed` (a 32-bit mix, so a misplaced or
/// stale word shows). Host and device compute it with this one function.
pub const fn pattern_word(seed: u32, src: u32, i: u32) -> u32 {
    let mut x = seed ^ src.wrapping_mul(0x9E37_79B9) ^ i.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// Bytes per stage of the `p2p_copy` kernel's bulk-copy path.
pub const BULK_CHUNK: u32 = 16384;
/// Shared-memory stages of the `p2p_copy` kernel's bulk-copy path (plus 8 bytes of mbarrier
/// per stage after them).
pub const BULK_STAGES: u32 = 4;

/// `p2p_copy`: copy `bytes` from a local buffer to a peer with 16-byte stores,
/// `iters` times. `use_bulk != 0` copies through shared memory with `cp.async.bulk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct P2pCopyParams {
    pub src: u64,
    pub dst: u64,
    pub bytes: u64,
    pub iters: u32,
    pub use_bulk: u32,
}

impl KernelParams for P2pCopyParams {
    const ENTRIES: &'static [&'static str] = &["p2p_copy"];
}

/// `ping_pong`: `iters` round trips of a flag between this rank and `peer` (one thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct PingPongParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    pub peer: u32,
    /// Nonzero on the rank that starts each round trip.
    pub initiator: u32,
    pub iters: u32,
    pub _pad: u32,
    /// Device address of a `u64`: elapsed nanoseconds of the whole loop (initiator only).
    pub elapsed_ns: u64,
}

impl KernelParams for PingPongParams {
    const ENTRIES: &'static [&'static str] = &["ping_pong"];
}

/// `wait_forever`: waits for a test flag no peer ever writes (deadline test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct WaitTestParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    pub peer: u32,
    pub value: u32,
}

impl KernelParams for WaitTestParams {
    const ENTRIES: &'static [&'static str] = &["wait_forever"];
}

/// `ptx_selftest`: runs every device-layer wrapper on known inputs, writes results.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SelftestParams {
    /// `u32` scratch the test reads and writes, at least [`SELFTEST_SCRATCH_WORDS`] words.
    pub scratch: u64,
    /// `u32` outputs, [`SELFTEST_OUT_WORDS`] words.
    pub out: u64,
    /// f32 inputs for the conversion checks, [`SELFTEST_CVT_INPUTS`] values.
    pub cvt_in: u64,
    /// FP8 outputs of the conversion checks, one byte per input.
    pub cvt_fp8: u64,
    /// bf16 outputs of the conversion checks, one u16 per input.
    pub cvt_bf16: u64,
}

impl KernelParams for SelftestParams {
    const ENTRIES: &'static [&'static str] = &["ptx_selftest"];
}
/// Output word indices of the `ptx_selftest` kernel (what each word holds is documented at
/// its store in `kernels/src/selftest.rs`).
pub mod selftest_out {
    #[allow(missing_docs)]
    pub const NTID: usize = 0;
    #[allow(missing_docs)]
    pub const NCTAID: usize = 1;
    #[allow(missing_docs)]
    pub const BALLOT_EVEN: usize = 2;
    #[allow(missing_docs)]
    pub const SHFL_IDX: usize = 3;
    #[allow(missing_docs)]
    pub const WARP_SUM: usize = 4;
    #[allow(missing_docs)]
    pub const ELECT_COUNT: usize = 5;
    #[allow(missing_docs)]
    pub const ATOM_SYS_ADD: usize = 6;
    #[allow(missing_docs)]
    pub const SCAN_OK: usize = 7;
    #[allow(missing_docs)]
    pub const SCAN_TOTAL: usize = 8;
    #[allow(missing_docs)]
    pub const TIMER_ADVANCES: usize = 9;
    #[allow(missing_docs)]
    pub const BULK_ROUNDTRIP_BAD: usize = 10;
    #[allow(missing_docs)]
    pub const V4_ROUNDTRIP_BAD: usize = 11;
    #[allow(missing_docs)]
    pub const ACQ_REL_GPU: usize = 12;
    #[allow(missing_docs)]
    pub const VOTE_ANY: usize = 13;
    #[allow(missing_docs)]
    pub const CAS_OLD: usize = 14;
    #[allow(missing_docs)]
    pub const RED_GPU_SUM: usize = 15;
    #[allow(missing_docs)]
    pub const GROUP_MAX: usize = 16;
    #[allow(missing_docs)]
    pub const SHFL_UP: usize = 17;
    #[allow(missing_docs)]
    pub const ATOM_SHARED_SUM: usize = 18;
    #[allow(missing_docs)]
    pub const DIV_RN: usize = 20;
    #[allow(missing_docs)]
    pub const FMA_RN: usize = 21;
    #[allow(missing_docs)]
    pub const ADD_RN: usize = 22;
    #[allow(missing_docs)]
    pub const MUL_RN: usize = 23;
    #[allow(missing_docs)]
    pub const CVT_F32_BF16: usize = 24;
    #[allow(missing_docs)]
    pub const ABS: usize = 25;
    #[allow(missing_docs)]
    pub const MAX: usize = 26;
    #[allow(missing_docs)]
    pub const VOLATILE_RELAXED: usize = 27;
    #[allow(missing_docs)]
    pub const NAMED_BARRIER: usize = 28;
    #[allow(missing_docs)]
    pub const MISC_OK: usize = 29;
    #[allow(missing_docs)]
    pub const DYN_SMEM: usize = 30;
    #[allow(missing_docs)]
    pub const SMID_VALID: usize = 31;
}

/// Scratch words of [`SelftestParams`].
pub const SELFTEST_SCRATCH_WORDS: usize = 2048;
/// Output words of [`SelftestParams`].
pub const SELFTEST_OUT_WORDS: usize = 64;
/// Conversion inputs of [`SelftestParams`].
pub const SELFTEST_CVT_INPUTS: usize = 4096;
