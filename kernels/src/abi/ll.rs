//! The low-latency kernels' parameter blocks, heap layout and mode codes.

use crate::abi::{CONTROL_BYTES, FP8_GROUP, KernelParams, MAX_TOPK, REGION_ALIGN, WaitCtx, align_up};
use bytemuck::{Pod, Zeroable};

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

/// Most ranks of a low-latency buffer: a received row's source rank travels in 8 bits of its
/// metadata (`recv_meta`). Nothing else in the low-latency kernels or their layout depends on
/// a rank count: every per-rank table is sized by the buffer's own.
pub const LL_MAX_RANKS: usize = 256;

/// The per-rank tables of a low-latency buffer, after the heap's [`crate::abi::Control`] block
/// (offsets from the heap's start, the same on every rank), sized by the buffer's rank count.
/// (The rank table the kernels read addresses from is the heap's own,
/// [`crate::abi::HeapTables::ranks`].)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LlRankTables {
    /// `u32 [2][R]`: dispatch send blocks of each source done, per half.
    pub dispatch_arrive: u64,
    /// `u32 [2][R]`: combine send blocks of each expert rank done, per half.
    pub combine_arrive: u64,
    /// `u32 [2][R]`: slot `s` holds the number of the dispatch rank `s` last started on each
    /// half. Starting dispatch `n` on a half ends rank `s`'s views of dispatch `n - 1` on it, so a
    /// sender may write rank `s`'s half for dispatch `n` once this reaches `n`.
    pub free: u64,
    /// `u32 [2][R]`: slot `s` holds the number of the combine rank `s` last started on each
    /// half (a sender may write rank `s`'s half for combine `n` once this reaches `n`).
    pub combine_free: u64,
    /// Heap offset where the tables end (half 0 starts).
    pub end: u64,
}

impl LlRankTables {
    /// The tables for `world` ranks.
    pub const fn new(world: u64) -> Self {
        let a = REGION_ALIGN;
        let dispatch_arrive = CONTROL_BYTES;
        let combine_arrive = align_up(dispatch_arrive + 2 * world * 4, a);
        let free = align_up(combine_arrive + 2 * world * 4, a);
        let combine_free = align_up(free + 2 * world * 4, a);
        let end = align_up(combine_free + 2 * world * 4, a);
        LlRankTables { dispatch_arrive, combine_arrive, free, combine_free, end }
    }

    /// Heap offset of word `[h][r]` of the per-half, per-rank table at `table` (`h` modulo 2,
    /// `r` modulo `world`, so no value reaches outside the table).
    #[inline(always)]
    pub const fn slot(table: u64, world: u32, h: u32, r: u32) -> u64 {
        let world = if world == 0 { 1 } else { world };
        table + 4 * ((h % 2) as u64 * world as u64 + (r % world) as u64)
    }
}

/// Rows per expert of a low-latency buffer, padded for the column-major scale layout.
pub const fn ll_scale_rows(world: u64, max_tokens: u64) -> u64 {
    align_up(world * max_tokens, 4)
}

/// Heap layout of one half of a low-latency buffer (offsets from the half's start), and where
/// the halves lie after the buffer's per-rank tables.
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
    /// `bf16 [T][S][H]`: combine rows coming home, `S` = the buffer's top-k slots per token
    /// (`[token][k]` per expert; pre-reduced, one row per (token, rank) at the rank's first
    /// top-k slot of the token).
    pub comb_x: u64,
    /// `bf16 [E_local][R * T][H]`: where a caller may write expert outputs for a zero-copy
    /// combine.
    pub comb_in: u64,
    /// Bytes of one half.
    pub bytes: u64,
    /// The per-rank tables before the halves.
    pub tables: LlRankTables,
}

impl LlHalfLayout {
    /// Layout of one half for `world` ranks, `experts_per_rank` local experts, `max_tokens`
    /// tokens per rank, hidden `hidden`, `max_topk` slots.
    pub const fn new(world: u64, experts_per_rank: u64, max_tokens: u64, hidden: u64, max_topk: u64) -> Self {
        let a = REGION_ALIGN;
        let rows = experts_per_rank * world * max_tokens;
        let toks = world * max_tokens;
        let groups = hidden / FP8_GROUP as u64;
        let slots = max_topk;
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
            tables: LlRankTables::new(world),
        }
    }

    /// Heap offset of half `h` (0 or 1).
    pub const fn half_offset(&self, h: u64) -> u64 {
        self.tables.end + h * self.bytes
    }

    /// Total heap bytes (control block, per-rank tables and both halves).
    pub const fn heap_bytes(&self) -> u64 {
        self.tables.end + 2 * self.bytes
    }
}

/// `ll_dispatch`: send half (every block: each token once to every rank that holds one of its
/// experts) and receive half (every block: its share of the received tokens into the local
/// experts' packed rows), as `stages` says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LlDispatchParams {
    pub wait: WaitCtx,
    /// Device address of this rank's rank table ([`crate::abi::HeapTables::ranks`] of the heap).
    pub ranks: u64,
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
    /// 1 when some rank is reached through NVSHMEM calls ([`crate::abi::RANK_PUT`] in its table entry).
    /// Only the NVSHMEM module reads it; 0 for the default module.
    pub any_put: u32,
    pub _pad: u32,
    /// Testing: `u64 [blocks][trace::MARKS]` GPU timestamps ([`trace`]), or 0.
    pub trace: u64,
}

impl KernelParams for LlDispatchParams {
    const ENTRIES: &'static [&'static str] = &["ll_dispatch"];
}

/// Words of `ll_dispatch`'s shared memory per warp in the send half: the count of a token's
/// destination ranks, then the ranks.
pub const LL_DEST_WORDS: u32 = 1 + MAX_TOPK as u32;

/// Dynamic shared memory of `ll_dispatch` with `warps` warps per block for `world` ranks: each
/// warp's token destinations (send half), or the per-source token prefix and 128 bytes of
/// block-scan scratch (receive half), whichever is larger.
pub const fn ll_dispatch_smem_bytes(warps: u32, world: u32) -> u32 {
    let dests = 4 * LL_DEST_WORDS * warps;
    let prefix = 4 * (world + 1) + 128;
    if dests > prefix { dests } else { prefix }
}

/// `ll_combine`: send half (and, fused, the receive half in every block).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LlCombineParams {
    pub wait: WaitCtx,
    /// Device address of this rank's rank table ([`crate::abi::HeapTables::ranks`] of the heap).
    pub ranks: u64,
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
    /// Out: `bf16 [N, H]`; 0 for a receive half that only drains (takes the arrivals, writes
    /// nothing).
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
    /// Slots per token in the combine rows area: the buffer's `max_topk`, the same on every
    /// rank whatever its own `k`.
    pub slot_k: u32,
    /// One of [`combine_mode`].
    pub mode: u32,
    /// As [`LlDispatchParams::any_put`].
    pub any_put: u32,
    /// 1 when `y` lies in this rank's symmetric heap (the zero-copy input): rows for put ranks
    /// are sent from there. 0: they are staged in this half's `comb_in` first.
    pub y_in_heap: u32,
    pub _pad: u32,
    /// Testing: `u64 [blocks][trace::MARKS]` GPU timestamps ([`trace`]), or 0.
    pub trace: u64,
}

/// Where the low-latency kernels stamp `%globaltimer` when a trace buffer is given: thread 0
/// of every block, at mark `m` of that block's row (`u64 [blocks][trace::MARKS]`). A mark the
/// launch does not reach (a half it does not run) stays as the host left it.
pub mod trace {
    /// Marks per block.
    pub const MARKS: usize = 8;
    /// The block started.
    pub const START: usize = 0;
    /// Send half: the block has issued its stores (every wait for a peer passed).
    pub const SENT: usize = 1;
    /// Send half: the block's stores are complete (`fence.acq_rel.sys`) and every rank is
    /// signalled.
    pub const SIGNALLED: usize = 2;
    /// Receive half: every source's send blocks have signalled this rank.
    pub const ARRIVED: usize = 3;
    /// Receive half: the block's share is placed (dispatch) or reduced (combine).
    pub const DONE: usize = 4;
    /// The block's last instruction (the grid's last block after the counts and counters).
    pub const END: usize = 5;
}

/// Dynamic shared memory of `ll_combine` for `experts_per_rank` local experts and `world`
/// ranks: the prefix of the received counts (`E_local + 1` words; pre-reduced, of the sources'
/// tokens, `world + 1` words) and 128 bytes of block-scan scratch.
pub const fn ll_combine_smem_bytes(experts_per_rank: u32, world: u32) -> u32 {
    let n = if experts_per_rank > world { experts_per_rank } else { world };
    4 * (n + 1) + 128
}

impl KernelParams for LlCombineParams {
    const ENTRIES: &'static [&'static str] = &["ll_combine"];
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
