//! The ABI shared by the host crate and the PTX: limits, error records, control block and
//! the parameter blocks every kernel takes by value.
//!
//! Every type here is `#[repr(C)]`, has explicit-width fields and is `bytemuck::Pod`, so the
//! host fills it byte for byte as the device reads it. Device addresses are `u64` (never
//! references). The PTX check in `tests/` compares each kernel's `.param .b8 [N]` size with
//! `size_of` of its parameter block, so a field added on one side only fails a test.

use bytemuck::{Pod, Zeroable};

/// Most ranks one group may have (one GPU each, one NVLink domain).
pub const MAX_RANKS: usize = 8;
/// Most top-k slots per token.
pub const MAX_TOPK: usize = 16;
/// Channels per FP8 scale: one f32 scale per token per 128 channels.
pub const FP8_GROUP: usize = 128;
/// Largest hidden size the kernels accept (a multiple of [`FP8_GROUP`]).
pub const MAX_HIDDEN: usize = 16384;
/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Floor for a group's absolute maximum before it becomes a scale (keeps scales normal).
pub const FP8_AMAX_FLOOR: f32 = 1.0e-4;
/// Most tokens per rank the low-latency buffer accepts.
pub const LL_MAX_TOKENS: usize = 1024;
/// Most experts the low-latency buffer accepts.
pub const LL_MAX_EXPERTS: usize = 1024;
/// Bytes every heap region is aligned to.
pub const REGION_ALIGN: u64 = 256;

/// Status codes of an [`ErrorRecord`].
pub mod status {
    /// Nothing went wrong.
    pub const OK: u32 = 0;
    /// A spin-wait passed its deadline.
    pub const TIMEOUT: u32 = 1;
    /// A rank would receive more rows than its receive buffer holds.
    pub const CAPACITY: u32 = 2;
    /// A top-k entry is outside `[-1, num_experts)`.
    pub const BAD_EXPERT: u32 = 3;
    /// An input holds fewer rows than the device found it must read (`expected` rows given,
    /// `seen` needed).
    pub const SHORT_INPUT: u32 = 4;
    /// The host raised this rank's abort flag ([`host_flag`]) while a kernel waited: `peer` is
    /// the rank that failed, `seen` the reason ([`abort_reason`]).
    pub const ABORTED: u32 = 5;
}

/// Words of a rank's host-mapped flags (pinned host memory the device can read): the host's
/// watchdog raises `ABORT` when a peer fails, and every spin-wait polls it; `REPORTED` mirrors
/// the status of this rank's first device error, for the watchdog to pass on to the peers.
pub mod host_flag {
    /// Host to device: 0, or the reason ([`super::abort_reason`]) every wait must stop for.
    pub const ABORT: usize = 0;
    /// Host to device: the rank that failed (written before `ABORT`).
    pub const CULPRIT: usize = 1;
    /// Device to host: the status code of this rank's first reported error, or 0.
    pub const REPORTED: usize = 2;
    /// Words in the allocation.
    pub const WORDS: usize = 4;
}

/// Why the host aborted a rank's waits (the `seen` field of a [`status::ABORTED`] record).
pub mod abort_reason {
    /// The culprit's process ended without leaving the group (its connection closed).
    pub const PEER_GONE: u32 = 1;
    /// The culprit's kernels or host reported an error.
    pub const PEER_ERROR: u32 = 2;
    /// The culprit called `Group::abort`.
    pub const USER: u32 = 3;
    /// The culprit dropped its group.
    pub const PEER_LEFT: u32 = 4;
}

/// Phase codes: which wait or check an [`ErrorRecord`] comes from.
pub mod phase {
    /// Cross-rank barrier.
    pub const BARRIER: u32 = 1;
    /// Test kernel waiting for a peer's signal.
    pub const TEST_SIGNAL: u32 = 2;
    /// Flag ping-pong benchmark.
    pub const PING_PONG: u32 = 3;
    /// High-throughput layout (routing check).
    pub const HT_LAYOUT: u32 = 4;
    /// High-throughput count exchange.
    pub const HT_NOTIFY: u32 = 5;
    /// High-throughput dispatch, waiting for every sender's data.
    pub const HT_DISPATCH: u32 = 6;
    /// High-throughput combine, waiting for every expert rank's rows.
    pub const HT_COMBINE: u32 = 7;
    /// Low-latency dispatch, checking routing.
    pub const LL_DISPATCH_SEND: u32 = 8;
    /// Low-latency dispatch receive half.
    pub const LL_DISPATCH_RECV: u32 = 9;
    /// Low-latency combine receive half.
    pub const LL_COMBINE_RECV: u32 = 10;

    /// Human-readable name of a phase code.
    pub const fn name(code: u32) -> &'static str {
        match code {
            BARRIER => "barrier",
            TEST_SIGNAL => "test signal",
            PING_PONG => "flag ping-pong",
            HT_LAYOUT => "high-throughput layout",
            HT_NOTIFY => "high-throughput notify (count exchange)",
            HT_DISPATCH => "high-throughput dispatch (waiting for senders)",
            HT_COMBINE => "high-throughput combine (waiting for expert ranks)",
            LL_DISPATCH_SEND => "low-latency dispatch send",
            LL_DISPATCH_RECV => "low-latency dispatch receive",
            LL_COMBINE_RECV => "low-latency combine receive",
            _ => "unknown phase",
        }
    }
}

/// What a kernel reports when something goes wrong. Lives in device memory, one per rank (the
/// host reads it after synchronising: system-scope atomics on host memory over PCIe are not
/// guaranteed); the first failing thread claims it (`claim` 0 -> 1), fills it, then publishes
/// `status` with a `.sys` release.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ErrorRecord {
    pub claim: u32,
    pub status: u32,
    pub phase: u32,
    pub rank: u32,
    pub peer: u32,
    pub block: u32,
    pub thread: u32,
    pub _pad: u32,
    pub expected: u64,
    pub seen: u64,
    pub waited_ns: u64,
    /// Device address of this rank's host-mapped flags ([`host_flag`]), or 0 for none: set
    /// once by the host, kept when the record is cleared (the last [`ERROR_RECORD_CLEAR`]
    /// bytes are not cleared), read only on the waits' slow path.
    pub host: u64,
}
const _: () = assert!(core::mem::size_of::<ErrorRecord>() == 64);
/// Bytes of an [`ErrorRecord`] that clearing it resets (all but `host`).
pub const ERROR_RECORD_CLEAR: usize = core::mem::offset_of!(ErrorRecord, host);
const _: () = assert!(ERROR_RECORD_CLEAR == 56);

/// Where a kernel reports errors and how long it may wait. Part of every parameter block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct WaitCtx {
    /// Device address of this rank's [`ErrorRecord`].
    pub err: u64,
    /// Deadline of every spin-wait, nanoseconds of `%globaltimer`.
    pub timeout_ns: u64,
    pub rank: u32,
    pub world: u32,
}
const _: () = assert!(core::mem::size_of::<WaitCtx>() == 24);

/// The heap base address of every rank, as mapped in this process (index = rank).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct Peers {
    pub base: [u64; MAX_RANKS],
}

/// Flags and counters every symmetric heap starts with (offset 0). Fields written by peers
/// are arrays indexed by the writer's rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct Control {
    /// Barrier: slot `s` holds the epoch rank `s` last reached.
    pub barrier_slots: [u32; MAX_RANKS],
    /// Barrier: this rank's epoch (local only).
    pub barrier_epoch: u32,
    /// High-throughput notify: this rank's call counter (local only).
    pub notify_seq: u32,
    /// Low-latency combine: blocks done per half (local, self-cleaning).
    pub ll_combine_done: [u32; 2],
    pub _pad0: [u32; 4],
    /// High-throughput notify: flag per (parity, source) holding the source's call counter.
    pub notify_flags: [[u32; MAX_RANKS]; 2],
    /// High-throughput dispatch: blocks of each source whose rows have landed.
    pub ht_dispatch_arrive: [u32; MAX_RANKS],
    /// Low-latency dispatch: blocks of each source done, per half.
    pub ll_dispatch_arrive: [[u32; MAX_RANKS]; 2],
    /// Low-latency combine: blocks of each expert rank done, per half.
    pub ll_combine_arrive: [[u32; MAX_RANKS]; 2],
    /// Low-latency dispatch: how many dispatches this rank has run on each half (local; the
    /// last block of a dispatch's receive half bumps it).
    pub ll_dispatch_seq: [u32; 2],
    /// Low-latency dispatch: receive blocks done per half (local, self-cleaning).
    pub ll_dispatch_done: [u32; 2],
    /// Low-latency dispatch: slot `s` holds the sequence number of the dispatch rank `s` last
    /// started on each half. Starting dispatch `n` on a half ends rank `s`'s views of dispatch
    /// `n - 1` on it, so a sender may write rank `s`'s half for dispatch `n` once this reaches `n`.
    pub ll_free: [[u32; MAX_RANKS]; 2],
    /// Tests: arrival counters written by peers (cumulative, never reset).
    pub test_flags: [u32; MAX_RANKS],
    /// Flag ping-pong: slot `s` written by rank `s` (the host zeroes it before each run).
    pub ping_flags: [u32; MAX_RANKS],
}
const _: () = assert!(core::mem::size_of::<Control>().is_multiple_of(16));

/// Bytes reserved for [`Control`] at the start of every heap.
pub const CONTROL_BYTES: u64 = align_up(core::mem::size_of::<Control>() as u64, REGION_ALIGN);

/// Rounds `x` up to a multiple of `a` (a power of two).
pub const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

// ---------------------------------------------------------------------------------------
// Foundation kernels (tests and benchmarks)
// ---------------------------------------------------------------------------------------

/// `barrier` kernel: a cross-rank barrier, `iters` times in a row.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct BarrierParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    pub iters: u32,
    pub _pad: u32,
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

/// `wait_forever`: waits for a test flag no peer ever writes (deadline test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct WaitTestParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    pub peer: u32,
    pub value: u32,
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

// ---------------------------------------------------------------------------------------
// High-throughput kernels
// ---------------------------------------------------------------------------------------

/// `ht_layout`: routing -> per-rank and per-expert counts, token positions.
/// Grid: one block per destination rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct HtLayoutParams {
    pub wait: WaitCtx,
    /// `topk_idx[N, K]`, i64 or i32 (`idx_i64`).
    pub topk_idx: u64,
    /// Out: `u8 [N, R]`, 1 if the token goes to the rank.
    pub is_token_in_rank: u64,
    /// Out: `i32 [N, R]`, the token's position among this rank's tokens for that rank, or -1.
    pub token_pos: u64,
    /// Out: `i32 [R]`.
    pub tokens_per_rank: u64,
    /// Out: `i32 [E]`.
    pub tokens_per_expert: u64,
    pub num_tokens: u32,
    pub k: u32,
    pub num_experts: u32,
    pub idx_i64: u32,
}

/// `ht_notify`: exchange counts, compute offsets. One block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct HtNotifyParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    /// Heap offset of the notify area: `i32 [2][R][R + E_local]`.
    pub notify_off: u64,
    /// `i32 [R]` from the layout.
    pub tokens_per_rank: u64,
    /// `i32 [E]` from the layout.
    pub tokens_per_expert: u64,
    /// Out: `i32 [R]`, first row of this rank's tokens in each destination's receive buffer
    /// (-1 where that destination would overflow).
    pub dest_base: u64,
    /// Out: `i32 [R + 1]`, first row of each source in this rank's receive buffer; the last
    /// entry is the number of rows received.
    pub src_base: u64,
    /// Out: `i32 [E_local]`, rows received per local expert, rounded up to `expert_alignment`.
    pub recv_expert_counts: u64,
    /// Out (may be 0): host-mapped `u32 [2 + E_local]`: word 0 is set to `host_ticket` last,
    /// after word 1 (rows received, or `u32::MAX` when the exchange failed or a receive buffer
    /// would overflow) and words `2..` (rows per local expert, aligned).
    pub num_recv_host: u64,
    pub experts_per_rank: u32,
    pub expert_alignment: u32,
    pub capacity: u32,
    /// Value published in word 0 of `num_recv_host` (the host's call counter, never 0).
    pub host_ticket: u32,
}

/// `ht_dispatch`: rows to every rank that needs them (a cached dispatch runs the `barrier`
/// kernel first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct HtDispatchParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    /// `[N, row_bytes]` payload (BF16 or FP8 rows).
    pub x: u64,
    /// `f32 [N, scale_cols]` or 0.
    pub scales: u64,
    /// `topk_idx [N, K]` (i64 or i32) or 0 (no top-k travels).
    pub topk_idx: u64,
    /// `f32 [N, K]` or 0.
    pub topk_weights: u64,
    /// `i32 [N, R]` from the layout.
    pub token_pos: u64,
    /// `i32 [R]` from notify.
    pub dest_base: u64,
    /// Heap offsets of the receive arrays (see [`HtHeapLayout`]).
    pub recv_x_off: u64,
    pub recv_scales_off: u64,
    pub recv_idx_off: u64,
    pub recv_w_off: u64,
    pub recv_src_off: u64,
    pub num_tokens: u32,
    pub row_bytes: u32,
    pub scale_cols: u32,
    pub k: u32,
    pub idx_i64: u32,
    pub experts_per_rank: u32,
}

/// `ht_combine`: rows back to their home rank, reduced there in rank order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct HtCombineParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    /// `bf16 [N_recv, H]` expert outputs, in dispatch's receive order.
    pub y: u64,
    /// `f32 [N_recv, K]` or 0.
    pub y_weights: u64,
    /// `i32 [R + 1]` from notify (this rank as receiver).
    pub src_base: u64,
    /// `u8 [N, R]` from the layout (this rank as sender).
    pub is_token_in_rank: u64,
    /// `bf16 [N, H]` or 0, added after the sum (`bias0` first).
    pub bias0: u64,
    pub bias1: u64,
    /// Out: `bf16 [N, H]`.
    pub out: u64,
    /// Out: `f32 [N, K]` or 0.
    pub out_weights: u64,
    /// `i32 [N, R]` from the layout (this rank as sender): finds this rank's own rows in `y`.
    pub token_pos: u64,
    pub recv_src_off: u64,
    pub comb_x_off: u64,
    pub comb_w_off: u64,
    /// Heap offset of the row flags `u32 [R][max_tokens]`: 1 once expert rank `r`'s row for a
    /// token has landed (the reducer zeroes it).
    pub comb_flags_off: u64,
    pub num_tokens: u32,
    pub hidden: u32,
    pub k: u32,
    /// Rows per source in the combine staging area (the buffer's max tokens per rank).
    pub max_tokens: u32,
    /// Rows `y` (and `y_weights`) hold; more received rows are an error, not a read past the end.
    pub y_rows: u32,
    /// Blocks `0..push_blocks` send rows home; the others reduce as rows arrive.
    pub push_blocks: u32,
}

/// Heap layout of a high-throughput buffer (offsets from the heap base). Computed once by
/// [`HtHeapLayout::new`] on the host; kernels get the offsets in their parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HtHeapLayout {
    pub notify: u64,
    pub recv_x: u64,
    pub recv_scales: u64,
    pub recv_idx: u64,
    pub recv_w: u64,
    pub recv_src: u64,
    pub comb_x: u64,
    pub comb_w: u64,
    pub comb_flags: u64,
    pub total: u64,
}

impl HtHeapLayout {
    /// Layout for `world` ranks, hidden size `hidden`, at most `max_topk` slots,
    /// `experts_per_rank` local experts, `max_tokens` tokens per rank and a receive buffer
    /// of `capacity` rows.
    pub const fn new(world: u64, hidden: u64, max_topk: u64, experts_per_rank: u64, max_tokens: u64, capacity: u64) -> Self {
        let a = REGION_ALIGN;
        let notify = CONTROL_BYTES;
        let recv_x = align_up(notify + 2 * world * (world + experts_per_rank) * 4, a);
        let recv_scales = align_up(recv_x + capacity * hidden * 2, a);
        let recv_idx = align_up(recv_scales + capacity * (hidden / FP8_GROUP as u64) * 4, a);
        let recv_w = align_up(recv_idx + capacity * max_topk * 4, a);
        let recv_src = align_up(recv_w + capacity * max_topk * 4, a);
        let comb_x = align_up(recv_src + capacity * 4, a);
        let comb_w = align_up(comb_x + world * max_tokens * hidden * 2, a);
        let comb_flags = align_up(comb_w + world * max_tokens * max_topk * 4, a);
        let total = align_up(comb_flags + world * max_tokens * 4, a);
        HtHeapLayout { notify, recv_x, recv_scales, recv_idx, recv_w, recv_src, comb_x, comb_w, comb_flags, total }
    }
}

// ---------------------------------------------------------------------------------------
// Low-latency kernels
// ---------------------------------------------------------------------------------------

/// FP8 scale formats of the low-latency dispatch.
pub mod scale_fmt {
    /// One f32 scale per 128 channels: `amax / 448`.
    pub const F32: u32 = 0;
    /// f32 scales rounded up to a power of two.
    pub const F32_POW2: u32 = 1;
    /// Power-of-two scales as their biased exponent byte (UE8M0), four packed per u32.
    pub const UE8M0: u32 = 2;
}

/// Scale layouts of the low-latency dispatch's received FP8 scales.
pub mod scale_layout {
    /// `[E_local][R * T][G]`: a row's scales side by side (`G` = `H / 128` f32, or
    /// `ceil(H / 512)` u32 of four packed UE8M0 bytes).
    pub const ROW_MAJOR: u32 = 0;
    /// `[E_local][G][M]` with `M = R * T` rounded up to a multiple of 4 (16 bytes): one
    /// expert's scales column by column, the TMA-aligned layout grouped FP8 GEMMs (DeepGEMM)
    /// read directly.
    pub const COLUMN_MAJOR: u32 = 1;
}

/// Low-latency combine modes.
pub mod combine_mode {
    /// Every (token, top-k slot) row goes home; the home sums `w_k * y_k` over k in order (f32).
    pub const PER_EXPERT: u32 = 0;
    /// Each expert rank sums `w_k * y_k` over its own slots of a token (f32, rounded to bf16)
    /// and sends one row per (token, rank); the home sums those rows in rank order (f32).
    pub const PRE_REDUCED: u32 = 1;
}

/// Rows per expert of a low-latency buffer, padded for the column-major scale layout.
pub const fn ll_scale_rows(world: u64, max_tokens: u64) -> u64 {
    align_up(world * max_tokens, 4)
}

/// Heap layout of one half of a low-latency buffer (offsets from the half's start).
///
/// Dispatch lands each token once per destination rank in `tok_*` (slot `[source][token]`),
/// then the receiver places it into every local expert's packed rows (`recv_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LlHalfLayout {
    /// `[E_local][R * T][row]`, row = 2H bytes (BF16) or H bytes (FP8).
    pub recv_x: u64,
    /// FP8 scales in the dispatch's [`scale_layout`]; room for `[E_local][G][M]` f32, `M` =
    /// [`ll_scale_rows`].
    pub recv_scales: u64,
    /// `u32 [E_local][R * T]`: `src_rank << 24 | k << 16 | token`.
    pub recv_meta: u64,
    /// `u32 [E_local]`: rows placed so far (receive-side atomics of this GPU).
    pub slot_counter: u64,
    /// `i32 [E_local]`: rows received per local expert (output of the receive half).
    pub recv_count: u64,
    /// `[R][T][2H]` bytes: each source's tokens, once per destination rank (FP8 rows use the
    /// first H bytes).
    pub tok_x: u64,
    /// `f32 [R][T][H / 128]`: their scales (FP8).
    pub tok_scales: u64,
    /// `u16 [R][T][MAX_TOPK]`: local expert of each top-k slot, `u16::MAX` for slots (and
    /// tokens) that are not this rank's. Written for every token of the source.
    pub tok_route: u64,
    /// `f32 [R][T][MAX_TOPK]`: the top-k weights of this rank's slots (when they travel).
    pub tok_w: u64,
    /// `u32 [R][T][MAX_TOPK]`: packed row (`expert * R * T + slot`) of each of this rank's
    /// slots, `u32::MAX` elsewhere (written by the receive half, read by combine).
    pub tok_pos: u64,
    /// `u32 [R]`: tokens each source dispatched.
    pub src_ntok: u64,
    /// `bf16 [T][S][H]`: combine rows coming home, `S` = max(top-k, ranks) slots per token
    /// (`[token][k]` per expert, `[token][rank]` pre-reduced).
    pub comb_x: u64,
    /// `bf16 [E_local][R * T][H]`: where a caller may write expert outputs for a zero-copy
    /// combine.
    pub comb_in: u64,
    /// Bytes of one half.
    pub bytes: u64,
}

impl LlHalfLayout {
    /// Layout of one half for `world` ranks, `experts_per_rank` local experts, `max_tokens`
    /// tokens per rank, hidden `hidden`, `max_topk` slots.
    pub const fn new(world: u64, experts_per_rank: u64, max_tokens: u64, hidden: u64, max_topk: u64) -> Self {
        let a = REGION_ALIGN;
        let rows = experts_per_rank * world * max_tokens;
        let toks = world * max_tokens;
        let groups = hidden / FP8_GROUP as u64;
        let slots = if max_topk > world { max_topk } else { world };
        let recv_x = 0;
        let recv_scales = align_up(recv_x + rows * hidden * 2, a);
        let recv_meta = align_up(recv_scales + experts_per_rank * groups * ll_scale_rows(world, max_tokens) * 4, a);
        let slot_counter = align_up(recv_meta + rows * 4, a);
        let recv_count = align_up(slot_counter + experts_per_rank * 4, a);
        let tok_x = align_up(recv_count + experts_per_rank * 4, a);
        let tok_scales = align_up(tok_x + toks * hidden * 2, a);
        let tok_route = align_up(tok_scales + toks * groups * 4, a);
        let tok_w = align_up(tok_route + toks * MAX_TOPK as u64 * 2, a);
        let tok_pos = align_up(tok_w + toks * MAX_TOPK as u64 * 4, a);
        let src_ntok = align_up(tok_pos + toks * MAX_TOPK as u64 * 4, a);
        let comb_x = align_up(src_ntok + world * 4, a);
        let comb_in = align_up(comb_x + max_tokens * slots * hidden * 2, a);
        let bytes = align_up(comb_in + rows * hidden * 2, a);
        LlHalfLayout {
            recv_x,
            recv_scales,
            recv_meta,
            slot_counter,
            recv_count,
            tok_x,
            tok_scales,
            tok_route,
            tok_w,
            tok_pos,
            src_ntok,
            comb_x,
            comb_in,
            bytes,
        }
    }

    /// Heap offset of half `h` (0 or 1).
    pub const fn half_offset(&self, h: u64) -> u64 {
        CONTROL_BYTES + h * self.bytes
    }

    /// Total heap bytes (control block and both halves).
    pub const fn heap_bytes(&self) -> u64 {
        CONTROL_BYTES + 2 * self.bytes
    }
}

/// `ll_dispatch`: send half (every block: each token once to every rank that holds one of its
/// experts) and receive half (every block: its share of the received tokens into the local
/// experts' packed rows), as `stages` says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LlDispatchParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    pub layout: LlHalfLayout,
    /// Heap offset of the half this call uses.
    pub half_off: u64,
    /// `bf16 [N, H]`.
    pub x: u64,
    /// `topk_idx [N, K]` (i64 or i32).
    pub topk_idx: u64,
    /// `f32 [N, K]` or 0: travels with the token (the pre-reduced combine needs it).
    pub topk_weights: u64,
    /// `i32 [E_local]` cumulative received rows, or 0.
    pub stats: u64,
    pub num_tokens: u32,
    pub hidden: u32,
    pub k: u32,
    pub idx_i64: u32,
    pub experts_per_rank: u32,
    pub max_tokens: u32,
    /// 1: cast to FP8 e4m3 in the kernel; 0: send BF16.
    pub fp8: u32,
    /// One of [`scale_fmt`].
    pub scale_fmt: u32,
    /// One of [`scale_layout`].
    pub scale_layout: u32,
    /// Which half (0 or 1); selects the arrival counters and sequence numbers.
    pub half: u32,
    /// [`stage`] bits: send, receive, or both.
    pub stages: u32,
    /// Blocks of the send grid on every rank (arrivals the receive half waits for per source).
    pub send_blocks: u32,
}

/// Dynamic shared memory of `ll_dispatch` with `warps` warps per block: one rank mask per warp
/// (send half), or the per-source token prefix (receive half), whichever is larger.
pub const fn ll_dispatch_smem_bytes(warps: u32) -> u32 {
    let prefix = 4 * (MAX_RANKS as u32 + 1);
    if 4 * warps > prefix { 4 * warps } else { prefix }
}

/// `ll_combine`: send half (and, fused, the receive half in every block).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LlCombineParams {
    pub wait: WaitCtx,
    pub peers: Peers,
    pub layout: LlHalfLayout,
    /// Heap offset of the half the matching dispatch used (metadata, counts).
    pub dispatch_half_off: u64,
    /// Heap offset of the half this combine uses (rows coming home).
    pub combine_half_off: u64,
    /// `bf16 [E_local][R * T][H]` expert outputs.
    pub y: u64,
    /// `topk_idx [N, K]` (i64 or i32) and `f32 [N, K]` weights (0 when pre-reduced), this
    /// rank as home.
    pub topk_idx: u64,
    pub topk_weights: u64,
    /// Out: `bf16 [N, H]`.
    pub out: u64,
    pub num_tokens: u32,
    pub hidden: u32,
    pub k: u32,
    pub idx_i64: u32,
    pub experts_per_rank: u32,
    pub max_tokens: u32,
    /// Which half this combine uses (0 or 1).
    pub half: u32,
    /// [`stage`] bits: send, receive, or both.
    pub stages: u32,
    /// Blocks of the send grid on every rank (arrivals the receive half waits for per source).
    pub send_blocks: u32,
    /// Slots per token in the combine rows area: max(the buffer's `max_topk`, ranks), the
    /// same on every rank whatever its own `k`.
    pub slot_k: u32,
    /// One of [`combine_mode`].
    pub mode: u32,
    pub _pad: u32,
}

/// [`LlCombineParams::stages`] bits.
pub mod stage {
    /// Run the send half.
    pub const SEND: u32 = 1;
    /// Run the receive half.
    pub const RECV: u32 = 2;
    /// Testing only: skip the dispatch's wait for peers to free their half (shows that the
    /// reuse test catches the race the wait prevents).
    pub const NO_REUSE_GUARD: u32 = 4;
}
