//! High-throughput dispatch and combine (prefill: thousands of tokens per rank).
//!
//! ```text
//! layout  = buf.layout(stream, topk_idx, k)             routing -> counts, positions (GPU)
//! handle  = buf.dispatch(stream, &layout, &args)        notify (count exchange) + dispatch
//! views   = buf.recv_x_bf16(&handle) ...                this rank's rows, in (source, token) order
//! (expert GEMMs)
//! buf.combine(stream, &handle, &combine_args)           rows home, summed in rank order
//! buf.cached_dispatch(stream, &mut handle, &args)       same routing again, no count exchange
//! ```
//!
//! Dispatch writes each row straight into its final place in the receiver's heap, so received
//! rows are views of the buffer ([`HeapView`]) valid until the next dispatch (the borrow checker
//! enforces it for views; a stale [`Handle`] is refused at run time). With
//! [`DispatchArgs::wait_for_counts`] off, nothing synchronises the host and dispatch + combine
//! can be captured in a CUDA graph (create the handle with [`HtBuffer::new_handle`] first).

use crate::driver::MappedHost;
use crate::error::{DriverContext, Error, Result};
use crate::group::{ArgStream, Group, Kernel};
use crate::heap::SymmetricHeap;
use crate::tensor::{DeviceArg, HeapView, TopkIdx, check_len, check_model_shape};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use half::bf16;
use moe_ep_kernels::abi::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Buffer configuration. Every rank must use the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtConfig {
    /// Experts in the model (a multiple of the rank count).
    pub num_experts: usize,
    /// Hidden size: a multiple of 128 from 128 to 16384.
    pub hidden: usize,
    /// Most top-k slots per token (1 to 16).
    pub max_topk: usize,
    /// Most tokens any rank dispatches in one call.
    pub max_tokens_per_rank: usize,
    /// Rows a rank can receive; `None`: `world * max_tokens_per_rank` (never overflows).
    pub recv_capacity: Option<usize>,
    /// Blocks (one per SM) of the dispatch and combine kernels.
    pub num_sms: u32,
    /// Threads per block of the dispatch and combine kernels.
    pub threads: u32,
    /// Combine blocks that send rows home (the rest reduce as rows arrive); 0 = the tuned
    /// split for the rank count and SM budget ([`HtConfig::tuned_push_blocks`]).
    pub combine_push_blocks: u32,
    /// How those blocks move rows ([`PushEngine`]).
    pub combine_push: PushEngine,
}

/// How combine's pushing blocks move rows to their home ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PushEngine {
    /// The tuned choice ([`HtConfig::tuned_push_engine`]).
    #[default]
    Tuned,
    /// Every warp copies rows through registers (16-byte loads and stores), releasing one flag
    /// per row.
    Registers,
    /// A few threads per block move whole rows with bulk copies (`cp.async.bulk`) through
    /// shared memory, several rows in flight each. Needs 16-byte aligned expert outputs and
    /// rows that fit the shared-memory budget; otherwise the registers are used.
    Bulk,
}

/// Shared memory the bulk push may use per block (H100 and H200 allow 227 KiB).
const BULK_PUSH_SMEM: u32 = 192 << 10;
/// Most bulk-pushing threads per block.
const BULK_PUSHERS: u32 = 4;

impl HtConfig {
    /// A configuration with the defaults tuned for `world` ranks.
    pub fn new(num_experts: usize, hidden: usize, max_topk: usize, max_tokens_per_rank: usize, world: usize) -> Self {
        let (num_sms, threads) = Self::tuned(world);
        HtConfig {
            num_experts,
            hidden,
            max_topk,
            max_tokens_per_rank,
            recv_capacity: None,
            num_sms,
            threads,
            combine_push_blocks: 0,
            combine_push: PushEngine::Tuned,
        }
    }

    /// This configuration with at most `sms` blocks: the tuned defaults for a rank that may use
    /// only part of its GPU ([`Group::sm_count`], e.g. ranks sharing a GPU under CUDA MPS). A
    /// push split that no longer fits falls back to the tuned one.
    pub fn fit_sms(self, sms: u32) -> Self {
        if self.num_sms <= sms {
            return self;
        }
        let num_sms = sms.max(2);
        let combine_push_blocks = if self.combine_push_blocks < num_sms { self.combine_push_blocks } else { 0 };
        HtConfig { num_sms, combine_push_blocks, ..self }
    }

    /// Default (SMs, threads) for `world` ranks: 24 SMs (DeepEP's default budget) and 1024
    /// threads (the kernels launch fewer where their registers cap them). On 4 x H200
    /// (`bench/results/`) combine is 10-12% faster at 32 SMs than at 24 (EP4 and EP2), and EP4
    /// dispatch levels off from 16 SMs; EP8 is not measured. The combine's push/reduce split is tuned per rank count and
    /// budget ([`HtConfig::tuned_push_blocks`]).
    pub const fn tuned(_world: usize) -> (u32, u32) {
        (24, 1024)
    }

    /// Combine blocks that push rows home, of `num_sms` blocks, for `world` ranks: the split
    /// measured best on 4 x H200 (`moe-ep-bench tune`, `bench/results/`), at least one pushing
    /// and one reducing block.
    pub const fn tuned_push_blocks(world: usize, num_sms: u32) -> u32 {
        // Pushers' share of the blocks, in eighths. EP4 (measured at 8, 16, 24 and 32 SMs): 5/8
        // was best at every budget. EP2: half was best at 8, 16 and 24 SMs (at 32 SMs 20 of 32
        // was 5% faster). More ranks send a larger share of the rows over NVLink; 3 and 5 to 8
        // ranks use the EP4 split (not measured).
        let eighths = match world {
            0..=2 => 4,
            _ => 5,
        };
        let p = num_sms * eighths / 8;
        if p == 0 {
            1
        } else if p >= num_sms {
            num_sms - 1
        } else {
            p
        }
    }

    /// The push engine [`PushEngine::Tuned`] picks for `world` ranks and `num_sms` blocks:
    /// registers, the engine every figure in `bench/results/` was measured with, until the
    /// bulk push is measured on a multi-GPU machine.
    pub const fn tuned_push_engine(_world: usize, _num_sms: u32) -> PushEngine {
        PushEngine::Registers
    }

    /// Bulk-pushing threads per block for rows of `row_bytes` (0: the rows do not fit).
    pub const fn bulk_pushers(row_bytes: u32) -> u32 {
        let n = BULK_PUSH_SMEM / moe_ep_kernels::abi::ht_combine_smem_bytes(1, row_bytes);
        if n < BULK_PUSHERS { n } else { BULK_PUSHERS }
    }

    /// Combine blocks that push: `combine_push_blocks`, or the tuned split when it is 0.
    pub fn push_blocks(&self, world: usize) -> u32 {
        if self.combine_push_blocks == 0 { Self::tuned_push_blocks(world, self.num_sms) } else { self.combine_push_blocks }
    }

    /// Receive rows per rank.
    pub fn capacity(&self, world: usize) -> usize {
        self.recv_capacity.unwrap_or(world * self.max_tokens_per_rank)
    }

    /// Heap layout for `world` ranks.
    pub fn heap_layout(&self, world: usize) -> HtHeapLayout {
        HtHeapLayout::new(
            world as u64,
            self.hidden as u64,
            self.max_topk as u64,
            (self.num_experts / world.max(1)) as u64,
            self.max_tokens_per_rank as u64,
            self.capacity(world) as u64,
        )
    }

    /// Symmetric-heap bytes per rank this configuration needs (a size hint): the layout and the
    /// heap's own tables.
    pub fn heap_bytes(&self, world: usize) -> u64 {
        crate::heap::SymmetricHeap::total_bytes(self.heap_layout(world).total, world)
    }

    /// Checks every limit for `world` ranks on a GPU with `sm_count` SMs.
    pub fn validate(&self, world: usize, sm_count: u32) -> Result<()> {
        check_model_shape("high-throughput", world, moe_ep_kernels::abi::MAX_RANKS, self.hidden, self.max_topk)?;
        if self.num_experts < world || !self.num_experts.is_multiple_of(world) {
            return Err(Error::invalid("num_experts", format!("{} is not a positive multiple of the {world} ranks", self.num_experts)));
        }
        if self.num_experts / world > 8192 {
            return Err(Error::invalid("num_experts", format!("{} experts per rank exceed 8192", self.num_experts / world)));
        }
        if self.max_tokens_per_rank == 0 || self.max_tokens_per_rank > 1 << 20 {
            return Err(Error::invalid("max_tokens_per_rank", format!("{} is outside 1..={}", self.max_tokens_per_rank, 1 << 20)));
        }
        let cap = self.capacity(world);
        if cap == 0 || cap > i32::MAX as usize / 2 {
            return Err(Error::invalid("recv_capacity", format!("{cap} rows is not a usable receive capacity")));
        }
        if self.num_sms == 0 || self.num_sms > sm_count.max(1) {
            return Err(Error::invalid(
                "num_sms",
                format!(
                    "{} blocks but this rank may use {sm_count} SMs (the kernels need every block resident; HtConfig::fit_sms caps the defaults)",
                    self.num_sms
                ),
            ));
        }
        if self.num_sms < 2 || self.combine_push_blocks >= self.num_sms {
            return Err(Error::invalid(
                "combine_push_blocks",
                format!("{} of {} blocks push; combine needs at least one pushing and one reducing block", self.combine_push_blocks, self.num_sms),
            ));
        }
        if self.threads < 32 || self.threads > 1024 || !self.threads.is_multiple_of(32) {
            return Err(Error::invalid("threads", format!("{} is not a multiple of 32 in 32..=1024", self.threads)));
        }
        Ok(())
    }
}

/// The routing of one dispatch, computed on the GPU by [`HtBuffer::layout`].
#[derive(Clone)]
pub struct Layout(Arc<LayoutData>);

struct LayoutData {
    /// The buffer that made it (layouts and handles only work with their own buffer).
    buffer: u64,
    /// Bumped by every `layout_into`, so a handle can tell the routing changed under it.
    version: std::sync::atomic::AtomicU64,
    is_token_in_rank: CudaSlice<u8>,
    token_pos: CudaSlice<i32>,
    tokens_per_rank: CudaSlice<i32>,
    tokens_per_expert: CudaSlice<i32>,
    num_tokens: usize,
    k: usize,
}

impl Layout {
    /// Tokens of this rank.
    pub fn num_tokens(&self) -> usize {
        self.0.num_tokens
    }
    /// Top-k slots per token.
    pub fn k(&self) -> usize {
        self.0.k
    }
    /// `u8 [N, R]`: 1 where the token goes to the rank.
    pub fn is_token_in_rank(&self) -> &CudaSlice<u8> {
        &self.0.is_token_in_rank
    }
    /// `i32 [R]`: tokens this rank sends to each rank.
    pub fn tokens_per_rank(&self) -> &CudaSlice<i32> {
        &self.0.tokens_per_rank
    }
    /// `i32 [E]`: (token, slot) pairs per expert.
    pub fn tokens_per_expert(&self) -> &CudaSlice<i32> {
        &self.0.tokens_per_expert
    }
    /// `i32 [N, R]`: the token's position among this rank's tokens for each rank, or -1.
    pub fn token_pos(&self) -> &CudaSlice<i32> {
        &self.0.token_pos
    }
    /// The stream its arrays (and its handles' arrays) are allocated and freed on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.0.token_pos.stream()
    }
}

/// What a dispatch sends per token.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    /// `bf16 [N, H]`.
    Bf16(&'a dyn DeviceArg<bf16>),
    /// FP8 e4m3 `u8 [N, H]` and f32 scales `[N, H / 128]`.
    Fp8 {
        /// The FP8 rows.
        x: &'a dyn DeviceArg<u8>,
        /// One f32 scale per 128 channels.
        scales: &'a dyn DeviceArg<f32>,
    },
}

/// Payload kinds, for the receive views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// BF16 rows.
    Bf16,
    /// FP8 rows with f32 scales.
    Fp8,
}

/// Dispatch inputs.
#[derive(Clone, Copy)]
pub struct DispatchArgs<'a> {
    /// The tokens.
    pub x: Payload<'a>,
    /// The routing the layout was computed from; `None` sends no top-k (the cached path of
    /// a combine's backward).
    pub topk_idx: Option<TopkIdx<'a>>,
    /// `f32 [N, K]`, travels with the top-k.
    pub topk_weights: Option<&'a dyn DeviceArg<f32>>,
    /// Round each local expert's received count up to a multiple of this (1 = none).
    pub expert_alignment: usize,
    /// Wait (host) until the counts are known, so the handle knows `num_recv` and the views
    /// are exact. Off: no host synchronisation at all (graph capture); views span the capacity.
    pub wait_for_counts: bool,
}

impl<'a> DispatchArgs<'a> {
    /// The arguments' own streams (see [`DeviceArg::owning_stream`]), and that of the layout
    /// whose arrays (and the handle's) the kernels read.
    fn streams<'s>(&'s self, layout: &'s Layout) -> Vec<ArgStream<'s>> {
        let x = match self.x {
            Payload::Bf16(x) => vec![("x", x.owning_stream())],
            Payload::Fp8 { x, scales } => vec![("x", x.owning_stream()), ("scales", scales.owning_stream())],
        };
        x.into_iter()
            .chain([
                ("topk_idx", self.topk_idx.and_then(|t| t.owning_stream())),
                ("topk_weights", self.topk_weights.and_then(|w| w.owning_stream())),
                ("layout", Some(layout.stream())),
            ])
            .collect()
    }

    /// BF16 tokens with their routing and weights, waiting for counts.
    pub fn bf16(x: &'a dyn DeviceArg<bf16>, topk_idx: TopkIdx<'a>, topk_weights: &'a dyn DeviceArg<f32>) -> Self {
        DispatchArgs { x: Payload::Bf16(x), topk_idx: Some(topk_idx), topk_weights: Some(topk_weights), expert_alignment: 1, wait_for_counts: true }
    }
}

/// Everything combine (and a cached dispatch) needs from a dispatch.
pub struct Handle {
    buffer: u64,
    /// The layout version the counts and offsets were computed for.
    layout_version: u64,
    generation: u64,
    layout: Layout,
    dest_base: CudaSlice<i32>,
    src_base: CudaSlice<i32>,
    recv_expert_counts: CudaSlice<i32>,
    /// `i32 [capacity]`: the source token of each received row, copied out of the heap after
    /// the dispatch, so this handle's combine still works after later dispatches.
    recv_src: CudaSlice<i32>,
    num_recv: Option<usize>,
    expert_counts: Option<Vec<usize>>,
    payload: PayloadKind,
    has_topk: bool,
    has_weights: bool,
    notified: bool,
}

impl Handle {
    /// Rows this rank received, if the dispatch waited for counts.
    pub fn num_recv(&self) -> Option<usize> {
        self.num_recv
    }
    /// Rows received per local expert (aligned), if the dispatch waited for counts.
    pub fn expert_counts(&self) -> Option<&[usize]> {
        self.expert_counts.as_deref()
    }
    /// `i32 [E_local]` rows received per local expert (aligned), on the device.
    pub fn expert_counts_device(&self) -> &CudaSlice<i32> {
        &self.recv_expert_counts
    }
    /// `i32 [R + 1]`: first received row of each source; the last entry is the row count.
    pub fn src_base_device(&self) -> &CudaSlice<i32> {
        &self.src_base
    }
    /// The routing this handle was made for.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LastOp {
    None,
    Dispatch,
    Combine,
}

/// Combine inputs.
#[derive(Clone, Copy)]
pub struct CombineArgs<'a> {
    /// `bf16 [N_recv, H]` expert outputs in the dispatch's receive order (already weighted).
    pub x: &'a dyn DeviceArg<bf16>,
    /// `f32 [N_recv, K]` weights to sum back (e.g. the received top-k weights), optional.
    pub topk_weights: Option<&'a dyn DeviceArg<f32>>,
    /// `bf16 [N, H]` added after the sum, `bias[0]` first.
    pub bias: [Option<&'a dyn DeviceArg<bf16>>; 2],
    /// Out: `bf16 [N, H]`.
    pub out: &'a dyn DeviceArg<bf16>,
    /// Out: `f32 [N, K]` summed weights (needs `topk_weights`).
    pub out_weights: Option<&'a dyn DeviceArg<f32>>,
}

/// A high-throughput buffer: the symmetric heap holding every rank's receive rows and
/// combine staging, plus the host-mapped word that tells the host the received count. Its
/// launches may be made on any streams of the group's GPU: a launch on another stream than the
/// buffer's previous one first waits for that stream (outside CUDA graph capture), so the
/// buffer's kernels run in the order of the calls.
pub struct HtBuffer {
    /// The group (a clone: the buffer owns its share).
    g: Group,
    cfg: HtConfig,
    hl: HtHeapLayout,
    heap: SymmetricHeap,
    host: MappedHost,
    ticket: u32,
    generation: u64,
    /// The latest dispatch before the latest [`HtBuffer::poison`] (its handles and older ones
    /// cannot combine: the fill overwrote the combine's staging flags).
    poisoned_after: u64,
    last: std::cell::Cell<LastOp>,
    /// The stream of the latest launch: a launch on another stream waits for it.
    chain: crate::work::StreamChain,
}

impl HtBuffer {
    /// Collective: every rank creates its buffer with the same configuration (a mismatch is an
    /// [`Error::CollectiveMismatch`] on every rank, before anything is allocated).
    pub fn new(g: &Group, cfg: HtConfig) -> Result<Self> {
        cfg.validate(g.world(), g.sm_count())?;
        g.agree("high-throughput buffer configuration", &format!("{cfg:?}"))?;
        let hl = cfg.heap_layout(g.world());
        let heap = g.new_heap(hl.total, "a high-throughput buffer")?;
        let host = MappedHost::new(g.context(), 2 + cfg.num_experts / g.world())?;
        Ok(HtBuffer {
            g: g.clone(),
            cfg,
            hl,
            heap,
            host,
            ticket: 0,
            generation: 0,
            poisoned_after: 0,
            last: std::cell::Cell::new(LastOp::None),
            chain: Default::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HtConfig {
        &self.cfg
    }

    /// Collective: changes the dispatch and combine launch sizes (every rank must pass the
    /// same values, since each receiver waits for every sender's blocks; a mismatch is an
    /// [`Error::CollectiveMismatch`] on every rank). A combine push-block count that no longer
    /// fits falls back to the tuned split.
    pub fn set_launch(&mut self, num_sms: u32, threads: u32) -> Result<()> {
        let push = if self.cfg.combine_push_blocks < num_sms { self.cfg.combine_push_blocks } else { 0 };
        let cfg = HtConfig { num_sms, threads, combine_push_blocks: push, ..self.cfg };
        cfg.validate(self.g.world(), self.g.sm_count())?;
        self.g.agree("high-throughput launch (set_launch)", &format!("{cfg:?}"))?;
        self.cfg = cfg;
        Ok(())
    }

    /// Collective: sets how many combine blocks push rows home (0: the tuned split); every
    /// rank must pass the same value.
    pub fn set_combine_push_blocks(&mut self, push: u32) -> Result<()> {
        let cfg = HtConfig { combine_push_blocks: push, ..self.cfg };
        cfg.validate(self.g.world(), self.g.sm_count())?;
        self.g.agree("high-throughput combine split (set_combine_push_blocks)", &format!("{cfg:?}"))?;
        self.cfg = cfg;
        Ok(())
    }

    /// Collective: sets how combine's pushing blocks move rows ([`PushEngine`]); every rank
    /// must pass the same value.
    pub fn set_combine_push(&mut self, engine: PushEngine) -> Result<()> {
        let cfg = HtConfig { combine_push: engine, ..self.cfg };
        self.g.agree("high-throughput combine push engine (set_combine_push)", &format!("{cfg:?}"))?;
        self.cfg = cfg;
        Ok(())
    }

    /// The push engine combine uses for expert outputs at 16-byte aligned addresses (the tuned
    /// choice resolved), and its bulk-pushing threads per block (0 with registers).
    pub fn combine_push(&self) -> (PushEngine, u32) {
        // Address 0 stands for any 16-byte aligned input.
        match self.launch_pushers(0) {
            0 => (PushEngine::Registers, 0),
            n => (PushEngine::Bulk, n),
        }
    }

    fn epr(&self) -> usize {
        self.cfg.num_experts / self.g.world()
    }

    /// Bulk-pushing threads of a combine whose expert outputs start at `y` (0: the register
    /// push: chosen, or the bulk push does not apply).
    fn launch_pushers(&self, y: u64) -> u32 {
        let engine = match self.cfg.combine_push {
            PushEngine::Tuned => HtConfig::tuned_push_engine(self.g.world(), self.cfg.num_sms),
            e => e,
        };
        let warps = self.g.launch_threads(Kernel::HtCombine, self.cfg.threads) / 32;
        if engine != PushEngine::Bulk || !y.is_multiple_of(16) { 0 } else { HtConfig::bulk_pushers((self.cfg.hidden * 2) as u32).min(warps) }
    }

    fn event(&self, stream: &Arc<CudaStream>) -> Result<CudaEvent> {
        stream.record_event(None).during("cuEventRecord", || "recording an operation's completion".into())
    }

    /// Routing -> counts and positions on the GPU. `topk_idx` is `[N, k]`.
    pub fn layout(&self, stream: &Arc<CudaStream>, topk_idx: TopkIdx<'_>, k: usize) -> Result<Layout> {
        if k == 0 || !topk_idx.elems().is_multiple_of(k) {
            return Err(Error::invalid("topk_idx", format!("{} elements is not a multiple of k = {k}", topk_idx.elems())));
        }
        let layout = self.new_layout(stream, topk_idx.elems() / k, k)?;
        self.layout_into(stream, topk_idx, &layout)?;
        Ok(layout)
    }

    /// Allocates a layout for `n` tokens of `k` slots (do this before a graph capture).
    pub fn new_layout(&self, stream: &Arc<CudaStream>, n: usize, k: usize) -> Result<Layout> {
        let world = self.g.world();
        if !(1..=self.cfg.max_topk).contains(&k) {
            return Err(Error::invalid("k", format!("{k} is outside 1..={} (the buffer's max_topk)", self.cfg.max_topk)));
        }
        if n > self.cfg.max_tokens_per_rank {
            return Err(Error::invalid("topk_idx", format!("{n} tokens exceed max_tokens_per_rank = {}", self.cfg.max_tokens_per_rank)));
        }
        let alloc_err = |what: &'static str| move || format!("allocating the layout's {what}");
        Ok(Layout(Arc::new(LayoutData {
            buffer: self.heap.id(),
            version: std::sync::atomic::AtomicU64::new(0),
            is_token_in_rank: stream.alloc_zeros::<u8>((n * world).max(1)).during("cuMemAlloc", alloc_err("is_token_in_rank"))?,
            token_pos: stream.alloc_zeros::<i32>((n * world).max(1)).during("cuMemAlloc", alloc_err("token_pos"))?,
            tokens_per_rank: stream.alloc_zeros::<i32>(world).during("cuMemAlloc", alloc_err("tokens_per_rank"))?,
            tokens_per_expert: stream.alloc_zeros::<i32>(self.cfg.num_experts).during("cuMemAlloc", alloc_err("tokens_per_expert"))?,
            num_tokens: n,
            k,
        })))
    }

    /// Recomputes `layout` from new routing of the same shape (graph-capturable).
    pub fn layout_into(&self, stream: &Arc<CudaStream>, topk_idx: TopkIdx<'_>, layout: &Layout) -> Result<()> {
        self.check_own_layout(layout)?;
        let d = &layout.0;
        d.version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (n, k) = (d.num_tokens, d.k);
        check_len("topk_idx", topk_idx.elems(), n * k, || format!("[{n}, {k}]"))?;
        let p = HtLayoutParams {
            wait: self.g.wait_ctx(),
            topk_idx: topk_idx.addr(),
            is_token_in_rank: d.is_token_in_rank.device_addr(),
            token_pos: d.token_pos.device_addr(),
            tokens_per_rank: d.tokens_per_rank.device_addr(),
            tokens_per_expert: d.tokens_per_expert.device_addr(),
            num_tokens: n as u32,
            k: k as u32,
            num_experts: self.cfg.num_experts as u32,
            idx_i64: topk_idx.is_i64(),
        };
        let smem = ht_layout_smem_bytes(self.epr() as u32);
        self.g.ordered(stream, &[("topk_idx", topk_idx.owning_stream()), ("layout", Some(layout.stream()))], || {
            self.g.launch(Kernel::HtLayout, self.g.world() as u32, 1024, smem, stream, &p)
        })
    }

    fn check_own_layout(&self, layout: &Layout) -> Result<()> {
        if layout.0.buffer != self.heap.id() {
            return Err(Error::ForeignHandle { reason: "this layout belongs to another high-throughput buffer".into() });
        }
        Ok(())
    }

    /// Allocates a handle for `layout` (do this before a graph capture). Its device arrays live
    /// on the layout's stream (the one [`HtBuffer::new_layout`] was given): allocated there, in
    /// stream order, and freed there when the handle drops. Every operation that reads them on
    /// another stream first waits for the layout's stream and then makes it wait for the
    /// operation, so a dropped handle's memory is never reused under a queued kernel. (A graph
    /// captured on another stream than the layout's needs that stream's work, these
    /// allocations included, finished before the capture: synchronise it.)
    pub fn new_handle(&self, layout: &Layout) -> Result<Handle> {
        self.check_own_layout(layout)?;
        let s = layout.stream();
        let world = self.g.world();
        let e = || "allocating a dispatch handle".to_string();
        Ok(Handle {
            buffer: self.heap.id(),
            layout_version: 0,
            generation: 0,
            layout: layout.clone(),
            dest_base: s.alloc_zeros::<i32>(world).during("cuMemAllocAsync", e)?,
            src_base: s.alloc_zeros::<i32>(world + 1).during("cuMemAllocAsync", e)?,
            recv_expert_counts: s.alloc_zeros::<i32>(self.epr()).during("cuMemAllocAsync", e)?,
            recv_src: s.alloc_zeros::<i32>(self.cfg.capacity(world)).during("cuMemAllocAsync", e)?,
            num_recv: None,
            expert_counts: None,
            payload: PayloadKind::Bf16,
            has_topk: false,
            has_weights: false,
            notified: false,
        })
    }

    /// Full dispatch: exchanges counts, then sends every token to every rank that needs it.
    pub fn dispatch(&mut self, stream: &Arc<CudaStream>, layout: &Layout, args: &DispatchArgs<'_>) -> Result<(Handle, CudaEvent)> {
        let mut h = self.new_handle(layout)?;
        let ev = self.dispatch_into(stream, &mut h, args)?;
        Ok((h, ev))
    }

    /// Full dispatch into an existing handle (same routing object; graph-capturable when
    /// `wait_for_counts` is off).
    pub fn dispatch_into(&mut self, stream: &Arc<CudaStream>, h: &mut Handle, args: &DispatchArgs<'_>) -> Result<CudaEvent> {
        self.check_dispatch_args(h, args)?;
        h.layout_version = h.layout.0.version.load(std::sync::atomic::Ordering::Relaxed);
        let world = self.g.world();
        self.ticket = self.ticket.wrapping_add(1).max(1);
        let wait = args.wait_for_counts;
        if wait {
            self.host.write(0, 0);
        }
        let p = HtNotifyParams {
            wait: self.g.wait_ctx(),
            peers: self.heap.peers("the high-throughput kernels")?,
            notify_off: self.hl.notify,
            tokens_per_rank: h.layout.0.tokens_per_rank.device_addr(),
            tokens_per_expert: h.layout.0.tokens_per_expert.device_addr(),
            dest_base: h.dest_base.device_addr(),
            src_base: h.src_base.device_addr(),
            recv_expert_counts: h.recv_expert_counts.device_addr(),
            num_recv_host: if wait { self.host.device_ptr() } else { 0 },
            experts_per_rank: self.epr() as u32,
            expert_alignment: args.expert_alignment.max(1) as u32,
            capacity: self.cfg.capacity(world) as u32,
            host_ticket: self.ticket,
        };
        let (g, layout) = (self.g.clone(), h.layout.clone());
        self.g.follow(&self.chain, stream)?;
        g.ordered(stream, &args.streams(&layout), || {
            g.launch(Kernel::HtNotify, 1, 256, 0, stream, &p)?;
            self.launch_dispatch(stream, h, args)
        })?;
        h.notified = true;
        h.num_recv = None;
        h.expert_counts = None;
        if wait {
            let (n, counts) = self.wait_counts()?;
            h.num_recv = Some(n);
            h.expert_counts = Some(counts);
        }
        self.event(stream)
    }

    /// Cached dispatch: the routing of an earlier full dispatch with this handle, without the
    /// count exchange (a barrier makes sure every receiver is ready instead).
    pub fn cached_dispatch(&mut self, stream: &Arc<CudaStream>, h: &mut Handle, args: &DispatchArgs<'_>) -> Result<CudaEvent> {
        if !h.notified {
            return Err(Error::invalid("handle", "cached dispatch needs a handle that went through a full dispatch"));
        }
        self.check_dispatch_args(h, args)?;
        self.check_layout_unchanged(h)?;
        self.g.follow(&self.chain, stream)?;
        self.g.launch_barrier_on(stream, &self.heap, 1, 0)?;
        let g = self.g.clone();
        let layout = h.layout.clone();
        g.ordered(stream, &args.streams(&layout), || self.launch_dispatch(stream, h, args))?;
        self.event(stream)
    }

    fn check_layout_unchanged(&self, h: &Handle) -> Result<()> {
        if h.layout.0.version.load(std::sync::atomic::Ordering::Relaxed) != h.layout_version {
            return Err(Error::StaleHandle {
                reason: "the layout was recomputed (layout_into) after this handle's dispatch; dispatch again with the new routing".into(),
            });
        }
        Ok(())
    }

    fn check_dispatch_args(&self, h: &Handle, args: &DispatchArgs<'_>) -> Result<()> {
        if h.buffer != self.heap.id() {
            return Err(Error::ForeignHandle { reason: "this handle belongs to another high-throughput buffer".into() });
        }
        let (n, k, hd) = (h.layout.0.num_tokens, h.layout.0.k, self.cfg.hidden);
        match args.x {
            Payload::Bf16(x) => check_len("x", x.elems(), n * hd, || format!("[{n}, {hd}] bf16"))?,
            Payload::Fp8 { x, scales } => {
                check_len("x", x.elems(), n * hd, || format!("[{n}, {hd}] fp8"))?;
                check_len("scales", scales.elems(), n * hd / FP8_GROUP, || format!("[{n}, {}] f32", hd / FP8_GROUP))?;
            }
        }
        if let Some(t) = &args.topk_idx {
            check_len("topk_idx", t.elems(), n * k, || format!("[{n}, {k}]"))?;
        }
        if let Some(w) = args.topk_weights {
            if args.topk_idx.is_none() {
                return Err(Error::invalid("topk_weights", "weights travel with topk_idx; pass both or neither"));
            }
            check_len("topk_weights", w.elems(), n * k, || format!("[{n}, {k}] f32"))?;
        }
        if args.expert_alignment == 0 || args.expert_alignment > 1 << 16 {
            return Err(Error::invalid("expert_alignment", format!("{} is outside 1..=65536", args.expert_alignment)));
        }
        Ok(())
    }

    fn launch_dispatch(&mut self, stream: &Arc<CudaStream>, h: &mut Handle, args: &DispatchArgs<'_>) -> Result<()> {
        let hd = self.cfg.hidden;
        let (x, scales, row_bytes, kind) = match args.x {
            Payload::Bf16(x) => (x.device_addr(), 0, 2 * hd, PayloadKind::Bf16),
            Payload::Fp8 { x, scales } => (x.device_addr(), scales.device_addr(), hd, PayloadKind::Fp8),
        };
        let p = HtDispatchParams {
            wait: self.g.wait_ctx(),
            peers: self.heap.peers("the high-throughput kernels")?,
            x,
            scales,
            topk_idx: args.topk_idx.map_or(0, |t| t.addr()),
            topk_weights: args.topk_weights.map_or(0, |w| w.device_addr()),
            token_pos: h.layout.0.token_pos.device_addr(),
            dest_base: h.dest_base.device_addr(),
            recv_x_off: self.hl.recv_x,
            recv_scales_off: self.hl.recv_scales,
            recv_idx_off: self.hl.recv_idx,
            recv_w_off: self.hl.recv_w,
            recv_src_off: self.hl.recv_src,
            num_tokens: h.layout.0.num_tokens as u32,
            row_bytes: row_bytes as u32,
            scale_cols: (hd / FP8_GROUP) as u32,
            k: h.layout.0.k as u32,
            idx_i64: args.topk_idx.map_or(0, |t| t.is_i64()),
            experts_per_rank: self.epr() as u32,
        };
        self.g.launch(Kernel::HtDispatch, self.cfg.num_sms, self.cfg.threads, 0, stream, &p)?;
        // The dispatch has waited for every sender: the heap's source tokens are complete. The
        // handle keeps its own copy for its combine (a later dispatch overwrites the heap's).
        let rows = self.cfg.capacity(self.g.world());
        // SAFETY: both ranges hold `rows` i32 (the heap's receive metadata, the handle's array,
        // both of this context); the copy is ordered after the dispatch on `stream`, and the
        // handle's array is freed only after `stream`'s later work (its layout's stream is
        // ordered around this operation).
        unsafe { crate::driver::copy_device_async(h.recv_src.device_addr(), self.heap.local_ptr() + self.hl.recv_src, rows * 4, stream) }
            .during("cuMemcpyDtoDAsync", || "keeping the received rows' source tokens with the handle".into())?;
        self.g.mark(stream)?;
        self.generation += 1;
        h.generation = self.generation;
        h.payload = kind;
        h.has_topk = args.topk_idx.is_some();
        h.has_weights = args.topk_weights.is_some();
        self.last.set(LastOp::Dispatch);
        Ok(())
    }

    /// Spins on the host-mapped word until notify published this call's ticket.
    fn wait_counts(&self) -> Result<(usize, Vec<usize>)> {
        let deadline = Instant::now() + self.g.config().timeout + Duration::from_secs(1);
        // A failure here leaves the exchange's state unknown: it fails the group (check() does
        // that for a device error; an unexplained one is failed here).
        let unexplained = |reason: String| {
            let e = Error::Internal { reason };
            self.g.fail(&e);
            e
        };
        while self.host.read(0) != self.ticket {
            if Instant::now() > deadline {
                // Work queued ahead on the stream may only have delayed the count exchange:
                // wait for the stream (and learn of any kernel's error), then look again.
                self.g.check()?;
                if self.host.read(0) == self.ticket {
                    break;
                }
                return Err(unexplained(format!("rank {}: dispatch counts never arrived and no kernel reported why", self.g.rank())));
            }
            std::hint::spin_loop();
        }
        let n = self.host.read(1);
        if n == u32::MAX {
            // The exchange failed or a buffer would overflow: the device record says which.
            self.g.check()?;
            return Err(unexplained(format!("rank {}: the count exchange failed and no kernel reported why", self.g.rank())));
        }
        let counts = (0..self.epr()).map(|j| self.host.read(2 + j) as usize).collect();
        Ok((n as usize, counts))
    }

    fn check_handle(&self, h: &Handle) -> Result<()> {
        if h.buffer != self.heap.id() {
            return Err(Error::ForeignHandle { reason: "this handle belongs to another high-throughput buffer".into() });
        }
        if h.generation != self.generation || h.generation == 0 {
            return Err(Error::StaleHandle {
                reason: format!(
                    "it belongs to dispatch #{} but the buffer's latest is #{}; its received rows were overwritten",
                    h.generation, self.generation
                ),
            });
        }
        Ok(())
    }

    /// A combine may use the handle of any dispatch of this buffer since the latest poison (not
    /// only the latest: two micro-batches in flight), since the handle keeps what it needs of
    /// the dispatch.
    fn check_combinable(&self, h: &Handle) -> Result<()> {
        if h.buffer != self.heap.id() {
            return Err(Error::ForeignHandle { reason: "this handle belongs to another high-throughput buffer".into() });
        }
        if h.generation == 0 {
            return Err(Error::invalid("handle", "it went through no dispatch yet"));
        }
        if h.generation <= self.poisoned_after {
            return Err(Error::StaleHandle {
                reason: format!("dispatch #{} is older than the latest poison (which overwrote the combine's staging)", h.generation),
            });
        }
        Ok(())
    }

    /// Rows of the receive views: the received count, or the capacity when it was not awaited.
    fn rows(&self, h: &Handle) -> usize {
        h.num_recv.unwrap_or(self.cfg.capacity(self.g.world()))
    }

    fn view<T>(&self, off: u64, len: usize) -> HeapView<'_, T> {
        HeapView::new(self.heap.local_ptr() + off, len)
    }

    /// Received BF16 rows `[N_recv, H]` (or the capacity when counts were not awaited).
    pub fn recv_x_bf16(&self, h: &Handle) -> Result<HeapView<'_, bf16>> {
        self.check_handle(h)?;
        if h.payload != PayloadKind::Bf16 {
            return Err(Error::invalid("handle", "the dispatch sent FP8; use recv_x_fp8"));
        }
        Ok(self.view(self.hl.recv_x, self.rows(h) * self.cfg.hidden))
    }

    /// Received FP8 rows `[N_recv, H]`.
    pub fn recv_x_fp8(&self, h: &Handle) -> Result<HeapView<'_, u8>> {
        self.check_handle(h)?;
        if h.payload != PayloadKind::Fp8 {
            return Err(Error::invalid("handle", "the dispatch sent BF16; use recv_x_bf16"));
        }
        Ok(self.view(self.hl.recv_x, self.rows(h) * self.cfg.hidden))
    }

    /// Received FP8 scales `[N_recv, H / 128]`.
    pub fn recv_scales(&self, h: &Handle) -> Result<HeapView<'_, f32>> {
        self.check_handle(h)?;
        if h.payload != PayloadKind::Fp8 {
            return Err(Error::invalid("handle", "the dispatch sent BF16, which has no scales"));
        }
        Ok(self.view(self.hl.recv_scales, self.rows(h) * self.cfg.hidden / FP8_GROUP))
    }

    /// Received top-k as local expert ids `[N_recv, K]` (-1 for other ranks' experts).
    pub fn recv_topk_idx(&self, h: &Handle) -> Result<HeapView<'_, i32>> {
        self.check_handle(h)?;
        if !h.has_topk {
            return Err(Error::invalid("handle", "the dispatch sent no top-k"));
        }
        Ok(self.view(self.hl.recv_idx, self.rows(h) * h.layout.0.k))
    }

    /// Received top-k weights `[N_recv, K]` (0 where the id is -1).
    pub fn recv_topk_weights(&self, h: &Handle) -> Result<HeapView<'_, f32>> {
        self.check_handle(h)?;
        if !h.has_weights {
            return Err(Error::invalid("handle", "the dispatch sent no top-k weights"));
        }
        Ok(self.view(self.hl.recv_w, self.rows(h) * h.layout.0.k))
    }

    /// Source token index of each received row `[N_recv]`.
    pub fn recv_src_idx(&self, h: &Handle) -> Result<HeapView<'_, i32>> {
        self.check_handle(h)?;
        Ok(self.view(self.hl.recv_src, self.rows(h)))
    }

    /// Combine: every received row goes back to its home rank, which sums them in rank order.
    /// Takes `&self`: it leaves the received rows intact, so views of them (e.g. the received
    /// weights) may be its inputs.
    pub fn combine(&self, stream: &Arc<CudaStream>, h: &Handle, args: &CombineArgs<'_>) -> Result<CudaEvent> {
        self.check_combinable(h)?;
        self.check_layout_unchanged(h)?;
        let (n, k, hd) = (h.layout.0.num_tokens, h.layout.0.k, self.cfg.hidden);
        // Rows of the input: at least the received count when the host knows it; otherwise the
        // kernel checks (and reports a short input instead of reading past it).
        let y_rows = args.x.elems() / hd;
        if args.x.elems() % hd != 0 || h.num_recv.is_some_and(|n| y_rows < n) {
            return Err(Error::invalid(
                "x",
                format!(
                    "has {} elements; combine needs [{}, {hd}] bf16 (the received rows)",
                    args.x.elems(),
                    h.num_recv.map_or("N_recv".into(), |n| n.to_string())
                ),
            ));
        }
        if let Some(w) = args.topk_weights
            && w.elems() < y_rows * k
        {
            return Err(Error::invalid("topk_weights", format!("has {} elements; combine needs [{y_rows}, {k}] f32 like its input rows", w.elems())));
        }
        for b in args.bias.iter().flatten() {
            check_len("bias", b.elems(), n * hd, || format!("[{n}, {hd}] bf16"))?;
        }
        check_len("out", args.out.elems(), n * hd, || format!("[{n}, {hd}] bf16"))?;
        if let Some(w) = args.out_weights {
            if args.topk_weights.is_none() {
                return Err(Error::invalid("out_weights", "summed weights need topk_weights as input"));
            }
            check_len("out_weights", w.elems(), n * k, || format!("[{n}, {k}] f32"))?;
        }
        self.g.follow(&self.chain, stream)?;
        if self.last.get() == LastOp::Combine {
            // A second combine of the same dispatch: peers must not write staging rows that
            // this rank may still be reducing.
            self.g.launch_barrier_on(stream, &self.heap, 1, 0)?;
        }
        let p = HtCombineParams {
            wait: self.g.wait_ctx(),
            peers: self.heap.peers("the high-throughput kernels")?,
            y: args.x.device_addr(),
            y_weights: args.topk_weights.map_or(0, |w| w.device_addr()),
            src_base: h.src_base.device_addr(),
            is_token_in_rank: h.layout.0.is_token_in_rank.device_addr(),
            bias0: args.bias[0].map_or(0, |b| b.device_addr()),
            bias1: args.bias[1].map_or(0, |b| b.device_addr()),
            out: args.out.device_addr(),
            out_weights: args.out_weights.map_or(0, |w| w.device_addr()),
            token_pos: h.layout.0.token_pos.device_addr(),
            recv_src: h.recv_src.device_addr(),
            comb_x_off: self.hl.comb_x,
            comb_w_off: self.hl.comb_w,
            comb_flags_off: self.hl.comb_flags,
            num_tokens: n as u32,
            hidden: hd as u32,
            k: k as u32,
            max_tokens: self.cfg.max_tokens_per_rank as u32,
            y_rows: y_rows.min(u32::MAX as usize) as u32,
            push_blocks: self.cfg.push_blocks(self.g.world()),
            bulk_pushers: self.launch_pushers(args.x.device_addr()),
            _pad: 0,
        };
        let smem = ht_combine_smem_bytes(p.bulk_pushers, (hd * 2) as u32);
        let streams = [
            ("x", args.x.owning_stream()),
            ("topk_weights", args.topk_weights.and_then(|w| w.owning_stream())),
            ("bias", args.bias[0].and_then(|b| b.owning_stream())),
            ("bias", args.bias[1].and_then(|b| b.owning_stream())),
            ("out", args.out.owning_stream()),
            ("out_weights", args.out_weights.and_then(|w| w.owning_stream())),
            ("handle", Some(h.layout.stream())),
        ];
        self.g.ordered(stream, &streams, || self.g.launch(Kernel::HtCombine, self.cfg.num_sms, self.cfg.threads, smem, stream, &p))?;
        self.last.set(LastOp::Combine);
        self.event(stream)
    }

    /// Fills this rank's receive rows and combine staging with `byte` (a debugging aid: rows
    /// a dispatch should have written but did not then stand out). Stream-ordered; the next
    /// dispatch's count exchange keeps peers from writing before it is done.
    /// Every existing handle is stale from then on: the fill overwrites the receive metadata
    /// a combine would compute peer addresses from.
    pub fn poison(&mut self, stream: &Arc<CudaStream>, byte: u8) -> Result<()> {
        self.generation += 1;
        self.poisoned_after = self.generation;
        self.fill_received(stream, byte)
    }

    /// Testing: fills `h`'s own copy of the received rows' source tokens with `byte`, as memory
    /// overwritten under it would: its combine then reads corrupt token indices, which the
    /// kernel must report ([`Error::BadIndex`]) instead of following.
    #[cfg(feature = "testing")]
    pub fn corrupt_handle_for_testing(&self, stream: &Arc<CudaStream>, h: &Handle, byte: u8) -> Result<()> {
        let rows = self.cfg.capacity(self.g.world());
        // SAFETY: the handle's array holds `rows` i32; stream order puts the fill after the
        // dispatch's copy and before the combine.
        unsafe { crate::driver::memset_d8_async(h.recv_src.device_addr(), byte, rows * 4, stream) }
            .during("cuMemsetD8Async", || "corrupting a handle".into())?;
        self.g.mark(stream)
    }

    fn fill_received(&self, stream: &Arc<CudaStream>, byte: u8) -> Result<()> {
        self.g.follow(&self.chain, stream)?;
        let from = self.hl.recv_x;
        let bytes = (self.hl.total - from) as usize;
        // SAFETY: the range lies inside this rank's heap; the caller's stream orders it after
        // this rank's earlier operations, and peers write only after the next exchange.
        unsafe { crate::driver::memset_d8_async(self.heap.local_ptr() + from, byte, bytes, stream) }
            .during("cuMemsetD8Async", || "poisoning the receive buffer".into())?;
        self.g.mark(stream)
    }

    /// Waits for this rank's kernels and reports any device error of this rank (see
    /// [`Group::check`]).
    pub fn check(&self) -> Result<()> {
        self.g.check()
    }

    /// Collective: releases the buffer on every rank (DeepEP's `destroy`): waits for this
    /// rank's kernels (deadline: the group's GPU timeout plus 1 s), checks that every rank
    /// destroys the same buffer, then frees it once no rank maps it. Dropping a buffer instead
    /// runs no collective and frees nothing a peer may still write into: its memory is
    /// quarantined until every rank has dropped it ([`Group::quarantined_bytes`]).
    pub fn destroy(self) -> Result<()> {
        self.g.destroy_heap(self.heap)
    }
}
