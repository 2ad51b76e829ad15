//! The high-throughput kernels' parameter blocks and heap layout.

use crate::abi::{CONTROL_BYTES, FP8_GROUP, KernelParams, Peers, REGION_ALIGN, WaitCtx, align_up};
use bytemuck::{Pod, Zeroable};

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

/// Dynamic shared memory of `ht_layout` for `experts_per_rank` local experts: 32 words of
/// per-rank counts and one word per local expert.
pub const fn ht_layout_smem_bytes(experts_per_rank: u32) -> u32 {
    4 * (32 + experts_per_rank)
}

impl KernelParams for HtLayoutParams {
    const ENTRIES: &'static [&'static str] = &["ht_layout"];
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

impl KernelParams for HtNotifyParams {
    const ENTRIES: &'static [&'static str] = &["ht_notify"];
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

impl KernelParams for HtDispatchParams {
    const ENTRIES: &'static [&'static str] = &["ht_dispatch"];
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
    /// `i32 [capacity]`: the source token of each received row, the handle's own copy of what
    /// the dispatch left in the heap (so a combine of an older dispatch still finds it).
    pub recv_src: u64,
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
    /// 0: every warp of a pushing block copies rows through registers. Otherwise the first
    /// lane of each of the first `bulk_pushers` warps pushes rows with bulk copies through
    /// [`HT_PUSH_STAGES`] row buffers of its own in dynamic shared memory
    /// ([`ht_combine_smem_bytes`]).
    pub bulk_pushers: u32,
    pub _pad: u32,
}

/// Row buffers per bulk-pushing thread of `ht_combine`.
pub const HT_PUSH_STAGES: u32 = 3;

/// Dynamic shared memory of `ht_combine` with `bulk_pushers` pushing threads (0: none):
/// [`HT_PUSH_STAGES`] rows of `row_bytes` each, then one mbarrier per row buffer.
pub const fn ht_combine_smem_bytes(bulk_pushers: u32, row_bytes: u32) -> u32 {
    bulk_pushers * HT_PUSH_STAGES * (row_bytes + 8)
}

impl KernelParams for HtCombineParams {
    const ENTRIES: &'static [&'static str] = &["ht_combine"];
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
