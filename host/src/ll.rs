//! Low-latency dispatch and combine (decode: at most a few hundred tokens per rank).
//!
//! No count round trip: each token goes **once** to every rank that holds one of its experts
//! (cast to FP8 on the way by default), into a fixed slot per (source, token); the receive side
//! waits for every rank's arrival counters and places each token into every local expert's
//! packed rows, so the output is per-expert packed rows with counts and source info. Combine
//! sends each (token, slot) row home ([`CombineMode::PerExpert`], exact) or one pre-reduced
//! row per (token, expert rank) ([`CombineMode::PreReduced`], about half the bytes).
//! Addresses never change, so a dispatch + combine pair can be captured in a CUDA graph and
//! replayed. Each kind of call alternates between two halves of the buffer, and each
//! call's receive half cleans what the next call of that half needs, so consecutive calls need
//! no reset barrier.
//!
//! Hook mode splits every call into a send launch and a receive launch ([`LlBuffer::dispatch_recv`],
//! [`LlBuffer::combine_recv`]) that the caller runs later; no SM is held in between. A
//! hook-mode dispatch's views can be taken at once (their contents are valid once the receive
//! launch has run); its combine waits for the receive half.

use crate::error::{DriverContext, Error, Result};
use crate::group::{ArgStream, Group, Kernel};
use crate::heap::SymmetricHeap;
use crate::tensor::{DeviceArg, HeapView, TopkIdx, check_len, check_model_shape};
use cudarc::driver::{CudaEvent, CudaStream};
use half::bf16;
use moe_ep_kernels::abi::*;
use std::marker::PhantomData;
use std::sync::Arc;

/// Buffer configuration. Every rank must use the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlConfig {
    /// Experts in the model (a multiple of the rank count, at most 1024).
    pub num_experts: usize,
    /// Hidden size: a multiple of 128 up to 16384.
    pub hidden: usize,
    /// Most top-k slots per token (1 to 16).
    pub max_topk: usize,
    /// Most tokens per rank per call (`T`, up to 1024).
    pub max_tokens_per_rank: usize,
    /// Blocks of the kernels (at most the SM count; every block stays resident); 0 = one per SM.
    pub num_blocks: u32,
    /// Threads per block.
    pub threads: u32,
}

impl LlConfig {
    /// A configuration with default launch sizes.
    pub fn new(num_experts: usize, hidden: usize, max_topk: usize, max_tokens_per_rank: usize) -> Self {
        LlConfig { num_experts, hidden, max_topk, max_tokens_per_rank, num_blocks: 0, threads: 512 }
    }

    /// Layout of one half for `world` ranks.
    pub fn half_layout(&self, world: usize) -> LlHalfLayout {
        LlHalfLayout::new(
            world as u64,
            (self.num_experts / world.max(1)) as u64,
            self.max_tokens_per_rank as u64,
            self.hidden as u64,
            self.max_topk as u64,
        )
    }

    /// Symmetric-heap bytes per rank (a size hint): the layout and the heap's own tables.
    pub fn heap_bytes(&self, world: usize) -> u64 {
        crate::heap::SymmetricHeap::total_bytes(self.half_layout(world).heap_bytes(), world)
    }

    /// Checks every limit for `world` ranks on a GPU with `sm_count` SMs.
    pub fn validate(&self, world: usize, sm_count: u32) -> Result<()> {
        check_model_shape("low-latency", world, moe_ep_kernels::abi::LL_MAX_RANKS, self.hidden, self.max_topk)?;
        if self.num_experts < world || !self.num_experts.is_multiple_of(world) || self.num_experts > LL_MAX_EXPERTS {
            return Err(Error::invalid(
                "num_experts",
                format!("{} is not a multiple of the {world} ranks in {world}..={LL_MAX_EXPERTS}", self.num_experts),
            ));
        }
        if !(1..=LL_MAX_TOKENS).contains(&self.max_tokens_per_rank) {
            return Err(Error::invalid("max_tokens_per_rank", format!("{} is outside 1..={LL_MAX_TOKENS}", self.max_tokens_per_rank)));
        }
        if self.num_blocks > sm_count.max(1) {
            return Err(Error::invalid(
                "num_blocks",
                format!("{} blocks but this rank may use {sm_count} SMs (every block must stay resident)", self.num_blocks),
            ));
        }
        if self.threads < 64 || self.threads > 1024 || !self.threads.is_multiple_of(32) {
            return Err(Error::invalid("threads", format!("{} is not a multiple of 32 in 64..=1024", self.threads)));
        }
        Ok(())
    }
}

/// FP8 scale formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleFormat {
    /// One f32 scale per 128 channels, `amax / 448`.
    F32,
    /// f32 scales rounded up to a power of two.
    F32Pow2,
    /// Power-of-two scales as UE8M0 exponent bytes, four packed per u32.
    Ue8m0,
}

impl ScaleFormat {
    fn code(self) -> u32 {
        match self {
            ScaleFormat::F32 => scale_fmt::F32,
            ScaleFormat::F32Pow2 => scale_fmt::F32_POW2,
            ScaleFormat::Ue8m0 => scale_fmt::UE8M0,
        }
    }
}

/// How the received FP8 scales are laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleLayout {
    /// `[E_local, R * T, G]`: each row's scales side by side.
    #[default]
    RowMajor,
    /// `[E_local, G, M]`, `M` = `R * T` rounded up to a multiple of 4 ([`LlBuffer::scale_rows`]):
    /// column-major and 16-byte (TMA) aligned, as grouped FP8 GEMMs such as DeepGEMM read it.
    /// Scale `g` of packed row `r` of expert `e` is element `(e * G + g) * M + r` (f32), or byte
    /// `g % 4` of word `(e * ceil(G / 4) + g / 4) * M + r` (UE8M0).
    ColumnMajor,
}

impl ScaleLayout {
    fn code(self) -> u32 {
        match self {
            ScaleLayout::RowMajor => scale_layout::ROW_MAJOR,
            ScaleLayout::ColumnMajor => scale_layout::COLUMN_MAJOR,
        }
    }
}

/// How combine brings expert outputs home.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CombineMode {
    /// Every (token, top-k slot) row goes home; the home computes `sum_k w_k * y_k` in f32 with
    /// fused multiply-adds in slot order and rounds once to bf16. Deterministic, and bit-exact
    /// with `reference::LlWorld::combine`.
    #[default]
    PerExpert,
    /// Each expert rank computes `p_r = bf16(sum over its slots k, in order, of w_k * y_k)` (f32,
    /// fused multiply-adds) and sends one row per (token, rank); the home computes
    /// `bf16(sum over ranks r, in order, of p_r)` in f32. Deterministic, bit-exact with
    /// `reference::LlWorld::combine_pre_reduced`; against the per-expert result it differs by
    /// the extra rounding of each `p_r` (at most half a bf16 ulp of `p_r` each) plus the final
    /// rounding. Needs the dispatch to have carried `topk_weights`; these weights are used.
    PreReduced,
}

/// What a low-latency dispatch delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// BF16 rows.
    Bf16,
    /// FP8 e4m3 rows cast in the kernel, with scales in the given format.
    Fp8(ScaleFormat),
}

/// Dispatch inputs.
#[derive(Clone, Copy)]
pub struct DispatchArgs<'a> {
    /// `bf16 [N, H]`, N <= T.
    pub x: &'a dyn DeviceArg<bf16>,
    /// `[N, K]`, -1 = no expert.
    pub topk_idx: TopkIdx<'a>,
    /// `f32 [N, K]` router weights: they travel with the tokens, for a
    /// [`CombineMode::PreReduced`] combine (the per-expert combine takes them at home).
    pub topk_weights: Option<&'a dyn DeviceArg<f32>>,
    /// What travels: BF16, or FP8 cast in the kernel.
    pub payload: Payload,
    /// Layout of the received FP8 scales.
    pub scale_layout: ScaleLayout,
    /// `i32 [E_local]`: received rows per local expert are added to it.
    pub stats: Option<&'a dyn DeviceArg<i32>>,
    /// Launch only the send half; run [`LlBuffer::dispatch_recv`] later.
    pub hook: bool,
}

impl<'a> DispatchArgs<'a> {
    /// FP8 (f32 scales, row-major) dispatch of `x` routed by `topk_idx`, no weights, no hook.
    pub fn fp8(x: &'a dyn DeviceArg<bf16>, topk_idx: TopkIdx<'a>) -> Self {
        DispatchArgs {
            x,
            topk_idx,
            topk_weights: None,
            payload: Payload::Fp8(ScaleFormat::F32),
            scale_layout: ScaleLayout::RowMajor,
            stats: None,
            hook: false,
        }
    }
}

/// Handle of one dispatch (for its views and its combine).
#[derive(Clone, Debug)]
pub struct Handle {
    /// The buffer (heap) that made it.
    buffer: u64,
    generation: u64,
    half: usize,
    num_tokens: usize,
    k: usize,
    payload: Payload,
    scale_layout: ScaleLayout,
    has_weights: bool,
    received: bool,
}

impl Handle {
    /// Which buffer half holds this dispatch's rows.
    pub fn half(&self) -> usize {
        self.half
    }
    /// True once the receive half ran (always, unless in hook mode).
    pub fn received(&self) -> bool {
        self.received
    }
}

/// Where combine reads the expert outputs from.
#[derive(Clone, Copy)]
pub enum CombineInput<'a> {
    /// `bf16 [E_local, R * T, H]` in the caller's memory.
    Tensor(&'a dyn DeviceArg<bf16>),
    /// The buffer's own combine input area ([`LlBuffer::combine_input`]), written by the caller.
    ZeroCopy,
}

/// Combine inputs (this rank as home: its routing, weights and output).
#[derive(Clone, Copy)]
pub struct CombineArgs<'a> {
    /// The expert outputs.
    pub x: CombineInput<'a>,
    /// The same `[N, K]` routing the dispatch used, with the same contents: the home finds each
    /// expert rank's rows from it (a pre-reduced row at the token's first top-k slot on its rank,
    /// as the dispatch routed it), so an entry changed in between reads rows nothing wrote.
    pub topk_idx: TopkIdx<'a>,
    /// `f32 [N, K]` weights, needed by [`CombineMode::PerExpert`] (a pre-reduced combine
    /// uses the ones the dispatch carried and refuses these).
    pub topk_weights: Option<&'a dyn DeviceArg<f32>>,
    /// Out: `bf16 [N, H]`.
    pub out: &'a dyn DeviceArg<bf16>,
    /// Per expert (exact) or pre-reduced per rank.
    pub mode: CombineMode,
    /// Launch only the send half; run [`LlBuffer::combine_recv`] later.
    pub hook: bool,
}

/// A combine whose receive half has not run yet (hook mode). It borrows the combine's
/// arguments, so the tensors the receive half reads and writes outlive its launch.
#[must_use = "run LlBuffer::combine_recv to finish the combine"]
pub struct CombinePending<'a> {
    /// The buffer (heap) whose combine this finishes.
    buffer: u64,
    /// Which of the buffer's combines (1-based).
    seq: u64,
    params: LlCombineParams,
    /// The own streams of the arguments the receive half reads and writes (routing, weights,
    /// output), by name: it is ordered against them too.
    streams: Vec<(&'static str, Arc<CudaStream>)>,
    /// Whether the receive half has been launched.
    done: bool,
    /// The combine's arguments (routing, weights, output), which the receive half reads and
    /// writes.
    _args: PhantomData<&'a ()>,
}

impl CombinePending<'_> {
    /// The same pending receive, no longer borrowing the combine's arguments: for bindings
    /// whose tensors are kept alive by another owner (the Python package's hook holds them).
    ///
    /// # Safety
    /// The combine's `topk_idx`, `topk_weights` and `out` must stay allocated (and `out` not
    /// reused) until the stream has run [`LlBuffer::combine_recv`]'s launch.
    pub unsafe fn into_unbound(self) -> CombinePending<'static> {
        CombinePending { buffer: self.buffer, seq: self.seq, params: self.params, streams: self.streams, done: self.done, _args: PhantomData }
    }
}

/// A low-latency buffer. Its launches may be made on any streams of the group's GPU: a launch
/// on another stream than the buffer's previous one first waits for that stream (outside CUDA
/// graph capture), so the buffer's kernels always run in the order of the calls.
pub struct LlBuffer {
    /// The group (a clone: the buffer owns its share).
    g: Group,
    cfg: LlConfig,
    hl: LlHalfLayout,
    heap: SymmetricHeap,
    dispatches: u64,
    /// The last dispatch before the latest [`LlBuffer::poison`] (its handles and older are stale).
    poisoned_after: u64,
    combines: std::cell::Cell<u64>,
    /// Per buffer half, the hook-mode dispatch whose receive half has not run: (its handle's
    /// generation, payload, scale layout). Two may be pending, one per half (two micro-batches
    /// in flight); a third dispatch would reuse a pending half and is refused.
    pending_dispatch: [Option<(u64, Payload, ScaleLayout)>; 2],
    /// Per combine half, the hook-mode combine whose receive half has not run: its number and
    /// parameters (two may be pending, as for dispatches).
    pending_combine: std::cell::Cell<[Option<(u64, LlCombineParams)>; 2]>,
    /// False only for testing (`MOE_EP_TESTING_NO_LL_REUSE_GUARD`, read when the buffer is
    /// built): lets the reuse test show the race the guard prevents.
    reuse_guard: bool,
    /// Testing: the kernels' timestamp tables (dispatch, then combine; `rows` blocks each),
    /// once `enable_trace` has run.
    trace: Option<(crate::driver::DeviceAlloc, usize)>,
    /// Testing: whether launches stamp the trace tables.
    tracing: bool,
    /// The stream of the latest launch: a launch on another stream waits for it.
    chain: crate::work::StreamChain,
}

/// Testing: the GPU timestamps (`%globaltimer`, ns) the last traced dispatch and combine
/// stamped, one row per block ([`moe_ep_kernels::abi::trace`] names the marks; 0 where a
/// launch did not reach a mark).
#[cfg(feature = "testing")]
#[derive(Clone, Debug)]
pub struct LlTrace {
    /// Dispatch launches (both halves of a hook-mode dispatch share the table).
    pub dispatch: Vec<[u64; trace::MARKS]>,
    /// Combine launches.
    pub combine: Vec<[u64; trace::MARKS]>,
}

impl LlBuffer {
    /// Collective: every rank creates its buffer with the same configuration (a mismatch is an
    /// [`Error::CollectiveMismatch`] on every rank, before anything is allocated). The default
    /// grid (`num_blocks: 0`) is the smallest SM count of the group's GPUs, the same on every
    /// rank.
    pub fn new(g: &Group, cfg: LlConfig) -> Result<Self> {
        Self::with_heap(g, cfg, |bytes| g.new_heap(bytes, "a low-latency buffer in moe-ep's heap (LlBuffer::new)"))
    }

    /// Collective, as [`LlBuffer::new`], with the buffer's memory from NVSHMEM's symmetric heap
    /// (`nvshmem_malloc`) instead of moe-ep's own IPC heap: the same kernels and layout, each
    /// peer reached at the address `nvshmem_ptr` gives, or, for a PE it does not map (or every
    /// other PE with `MOE_EP_NVSHMEM_PUT=all`), through NVSHMEM calls by the kernels of the
    /// module `nv` bound ([`LlBuffer::put_ranks`]; without that module such a PE is an error on
    /// every rank). [`LlBuffer::poison`] is refused on a buffer with such PEs. `destroy` frees the
    /// memory with `nvshmem_free`; a buffer dropped without it leaves its memory in NVSHMEM's
    /// heap until NVSHMEM is finalised. The buffer holds `nv` until it is destroyed or dropped.
    #[cfg(feature = "nvshmem")]
    pub fn with_nvshmem(g: &Group, nv: &Arc<crate::nvshmem::Nvshmem>, cfg: LlConfig) -> Result<Self> {
        Self::with_heap(g, cfg, |bytes| nv.new_heap(g, bytes))
    }

    fn with_heap(g: &Group, cfg: LlConfig, heap: impl FnOnce(u64) -> Result<SymmetricHeap>) -> Result<Self> {
        cfg.validate(g.world(), g.sm_count())?;
        let cfg = LlConfig { num_blocks: if cfg.num_blocks == 0 { g.min_sm_count()?.max(1) } else { cfg.num_blocks }, ..cfg };
        g.agree("low-latency buffer configuration", &format!("{cfg:?}"))?;
        let hl = cfg.half_layout(g.world());
        // (The heap writes its rank table, which the kernels read every address from.)
        let heap = heap(hl.heap_bytes())?;
        Ok(LlBuffer {
            g: g.clone(),
            cfg,
            hl,
            heap,
            dispatches: 0,
            poisoned_after: 0,
            combines: std::cell::Cell::new(0),
            pending_dispatch: [None, None],
            pending_combine: std::cell::Cell::new([None, None]),
            reuse_guard: std::env::var_os("MOE_EP_TESTING_NO_LL_REUSE_GUARD").is_none(),
            trace: None,
            tracing: false,
            chain: Default::default(),
        })
    }

    /// Testing: from now on the kernels stamp GPU timestamps at their marks (see [`LlTrace`]).
    #[cfg(feature = "testing")]
    pub fn enable_trace(&mut self) -> Result<()> {
        let rows = self.g.sm_count().max(self.cfg.num_blocks) as usize;
        if self.trace.as_ref().is_none_or(|(_, r)| *r < rows) {
            let t = crate::driver::DeviceAlloc::zeroed(self.g.context(), 2 * rows * trace::MARKS * 8)?;
            self.trace = Some((t, rows));
        }
        self.tracing = true;
        Ok(())
    }

    /// Testing: launches stop stamping (the tables stay allocated until the buffer drops:
    /// freeing memory would wait for the whole device).
    #[cfg(feature = "testing")]
    pub fn disable_trace(&mut self) {
        self.tracing = false;
    }

    /// Testing: the timestamps of the launches since the last call (waits for `stream`), then
    /// clears them.
    #[cfg(feature = "testing")]
    pub fn take_trace(&self, stream: &Arc<CudaStream>) -> Result<LlTrace> {
        let Some((t, rows)) = &self.trace else {
            return Err(Error::invalid("trace", "enable_trace has not run on this buffer"));
        };
        let n = (self.cfg.num_blocks as usize).min(*rows);
        let mut d = vec![[0u64; trace::MARKS]; n];
        let mut c = vec![[0u64; trace::MARKS]; n];
        let table = rows * trace::MARKS * 8;
        // SAFETY: both tables lie inside the trace allocation (`rows` rows each, `n <= rows`).
        unsafe {
            crate::driver::copy_to_host(t.ptr(), &mut d, stream).during("cuMemcpyDtoH", || "reading the dispatch trace".into())?;
            crate::driver::copy_to_host(t.ptr() + table as u64, &mut c, stream).during("cuMemcpyDtoH", || "reading the combine trace".into())?;
            crate::driver::memset_d8_async(t.ptr(), 0, 2 * table, stream).during("cuMemsetD8Async", || "clearing the trace".into())?;
        }
        Ok(LlTrace { dispatch: d, combine: c })
    }

    /// The trace table of kernel `which` (0 dispatch, 1 combine), or 0 when not tracing.
    fn trace_addr(&self, which: u64) -> u64 {
        match &self.trace {
            Some((t, rows)) if self.tracing && self.cfg.num_blocks as usize <= *rows => t.ptr() + which * (*rows * trace::MARKS * 8) as u64,
            _ => 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LlConfig {
        &self.cfg
    }

    /// Collective: changes the kernels' blocks and threads per block (every rank must pass the
    /// same values: each receiver waits for every sender's blocks). Not while a hook-mode call
    /// is pending.
    pub fn set_launch(&mut self, num_blocks: u32, threads: u32) -> Result<()> {
        if self.pending_dispatch.iter().any(Option::is_some) || self.pending_combine.get().iter().any(Option::is_some) {
            return Err(Error::PendingHook { reason: "set_launch while a hook-mode receive half is pending".into() });
        }
        let cfg = LlConfig { num_blocks, threads, ..self.cfg };
        cfg.validate(self.g.world(), self.g.sm_count())?;
        let cfg = LlConfig { num_blocks: if num_blocks == 0 { self.g.min_sm_count()?.max(1) } else { num_blocks }, ..cfg };
        self.g.agree("low-latency launch (set_launch)", &format!("{cfg:?}"))?;
        self.cfg = cfg;
        Ok(())
    }

    fn epr(&self) -> usize {
        self.cfg.num_experts / self.g.world()
    }

    fn rows_per_expert(&self) -> usize {
        self.g.world() * self.cfg.max_tokens_per_rank
    }

    fn half_off(&self, half: usize) -> u64 {
        self.hl.half_offset(half as u64)
    }

    /// Device address of this rank's rank table (the kernels' `ranks`).
    fn ranks(&self) -> u64 {
        self.heap.rank_table()
    }

    /// The kernels' `any_put`: 1 when some rank is reached through NVSHMEM calls.
    fn any_put(&self) -> u32 {
        !self.heap.put_ranks().is_empty() as u32
    }

    fn event(&self, stream: &Arc<CudaStream>) -> Result<CudaEvent> {
        stream.record_event(None).during("cuEventRecord", || "recording an operation's completion".into())
    }

    fn check_routing(&self, topk_idx: &TopkIdx<'_>, n: usize) -> Result<usize> {
        if n > self.cfg.max_tokens_per_rank {
            return Err(Error::invalid("x", format!("{n} tokens exceed max_tokens_per_rank = {}", self.cfg.max_tokens_per_rank)));
        }
        let k = topk_idx.elems().checked_div(n).unwrap_or(self.cfg.max_topk);
        if !(1..=self.cfg.max_topk).contains(&k) || topk_idx.elems() != n * k {
            return Err(Error::invalid(
                "topk_idx",
                format!("has {} elements for {n} tokens; expected [{n}, k] with k in 1..={}", topk_idx.elems(), self.cfg.max_topk),
            ));
        }
        Ok(k)
    }

    fn dispatch_params(&self, half: usize, n: usize, k: usize, args: &DispatchArgs<'_>, stages: u32) -> LlDispatchParams {
        let (fp8, fmt) = match args.payload {
            Payload::Bf16 => (0, 0),
            Payload::Fp8(f) => (1, f.code()),
        };
        LlDispatchParams {
            wait: self.g.wait_ctx(),
            ranks: self.ranks(),
            layout: self.hl,
            half_off: self.half_off(half),
            x: args.x.device_addr(),
            topk_idx: args.topk_idx.addr(),
            topk_weights: args.topk_weights.map_or(0, |w| w.device_addr()),
            stats: args.stats.map_or(0, |s| s.device_addr()),
            num_tokens: n as u32,
            hidden: self.cfg.hidden as u32,
            k: k as u32,
            idx_i64: args.topk_idx.is_i64(),
            experts_per_rank: self.epr() as u32,
            max_tokens: self.cfg.max_tokens_per_rank as u32,
            fp8,
            scale_fmt: fmt,
            scale_layout: args.scale_layout.code(),
            half: half as u32,
            stages,
            send_blocks: self.cfg.num_blocks,
            any_put: self.any_put(),
            _pad: 0,
            trace: self.trace_addr(0),
        }
    }

    /// Dispatch: every (token, slot) to its expert's rank. Without `hook`, returns once both
    /// halves are enqueued.
    pub fn dispatch(&mut self, stream: &Arc<CudaStream>, args: &DispatchArgs<'_>) -> Result<(Handle, CudaEvent)> {
        let half = (self.dispatches % 2) as usize;
        if let Some((g, ..)) = self.pending_dispatch[half] {
            return Err(Error::PendingHook {
                reason: format!(
                    "dispatch #{g}'s receive hook has not run and this dispatch would reuse its buffer half (two may be pending; LlBuffer::recover_pending_hooks runs a dropped hook)"
                ),
            });
        }
        let hd = self.cfg.hidden;
        if args.x.elems() % hd != 0 {
            return Err(Error::invalid("x", format!("has {} elements, not a multiple of hidden = {hd}", args.x.elems())));
        }
        let n = args.x.elems() / hd;
        let k = self.check_routing(&args.topk_idx, n)?;
        if let Some(s) = args.stats {
            check_len("stats", s.elems(), self.epr(), || format!("[{}] i32", self.epr()))?;
        }
        if let Some(w) = args.topk_weights {
            check_len("topk_weights", w.elems(), n * k, || format!("[{n}, {k}] f32"))?;
        }
        let mut stages = if args.hook { stage::SEND } else { stage::SEND | stage::RECV };
        if !self.reuse_guard {
            stages |= stage::NO_REUSE_GUARD;
        }
        let p = self.dispatch_params(half, n, k, args, stages);
        let streams = [
            ("x", args.x.owning_stream()),
            ("topk_idx", args.topk_idx.owning_stream()),
            ("topk_weights", args.topk_weights.and_then(|w| w.owning_stream())),
            ("stats", args.stats.and_then(|s| s.owning_stream())),
        ];
        let smem = ll_dispatch_smem_bytes(self.cfg.threads / 32, self.g.world() as u32);
        self.g.follow(&self.chain, stream)?;
        self.g.ordered(stream, &streams, || self.launch(Kernel::LlDispatch, smem, stream, &p))?;
        self.dispatches += 1;
        self.pending_dispatch[half] = args.hook.then_some((self.dispatches, args.payload, args.scale_layout));
        let h = Handle {
            buffer: self.heap.id(),
            generation: self.dispatches,
            half,
            num_tokens: n,
            k,
            payload: args.payload,
            scale_layout: args.scale_layout,
            has_weights: args.topk_weights.is_some(),
            received: !args.hook,
        };
        Ok((h, self.event(stream)?))
    }

    /// The receive half of a hook-mode dispatch.
    pub fn dispatch_recv(&mut self, stream: &Arc<CudaStream>, h: &mut Handle, stats: Option<&dyn DeviceArg<i32>>) -> Result<CudaEvent> {
        self.check_own(h.buffer)?;
        if h.received || self.pending_dispatch[h.half].map(|(g, ..)| g) != Some(h.generation) {
            return Err(Error::StaleHandle { reason: "dispatch_recv needs the handle of a dispatch sent in hook mode and not yet received".into() });
        }
        self.check_not_poisoned(h)?;
        let (fp8, fmt) = match h.payload {
            Payload::Bf16 => (0, 0),
            Payload::Fp8(f) => (1, f.code()),
        };
        let mut p = LlDispatchParams { stages: stage::RECV, ..Default::default() };
        p.wait = self.g.wait_ctx();
        p.ranks = self.ranks();
        p.any_put = self.any_put();
        p.layout = self.hl;
        p.half_off = self.half_off(h.half);
        p.half = h.half as u32;
        p.hidden = self.cfg.hidden as u32;
        p.experts_per_rank = self.epr() as u32;
        p.max_tokens = self.cfg.max_tokens_per_rank as u32;
        p.fp8 = fp8;
        p.scale_fmt = fmt;
        p.scale_layout = h.scale_layout.code();
        p.send_blocks = self.cfg.num_blocks;
        p.trace = self.trace_addr(0);
        if let Some(s) = stats {
            check_len("stats", s.elems(), self.epr(), || format!("[{}] i32", self.epr()))?;
            p.stats = s.device_addr();
        }
        let smem = ll_dispatch_smem_bytes(self.cfg.threads / 32, self.g.world() as u32);
        self.g.follow(&self.chain, stream)?;
        self.g.ordered(stream, &[("stats", stats.and_then(|s| s.owning_stream()))], || self.launch(Kernel::LlDispatch, smem, stream, &p))?;
        h.received = true;
        self.pending_dispatch[h.half] = None;
        self.event(stream)
    }

    /// Ranks this buffer's kernels reach through NVSHMEM calls, in rank order: those NVSHMEM
    /// does not map (another node), or every other rank with `MOE_EP_NVSHMEM_PUT=all`; none on
    /// moe-ep's own heap.
    pub fn put_ranks(&self) -> &[usize] {
        self.heap.put_ranks()
    }

    fn check_own(&self, buffer: u64) -> Result<()> {
        if buffer != self.heap.id() {
            return Err(Error::ForeignHandle { reason: "this handle belongs to another low-latency buffer".into() });
        }
        Ok(())
    }

    /// A combine needs the dispatch's receive half to have run (hook mode).
    fn check_received(&self, h: &Handle) -> Result<()> {
        self.check_view(h)?;
        if !h.received {
            return Err(Error::PendingHook { reason: "the dispatch's receive hook has not run yet".into() });
        }
        Ok(())
    }

    /// Views of `h` may be taken as soon as it exists, in hook mode too: like every view of
    /// queued work, their contents are valid once the stream has run the receive half.
    fn check_view(&self, h: &Handle) -> Result<()> {
        self.check_own(h.buffer)?;
        if self.dispatches.saturating_sub(h.generation) >= 2 {
            return Err(Error::StaleHandle { reason: format!("dispatch #{} was overwritten by dispatch #{}", h.generation, self.dispatches) });
        }
        self.check_not_poisoned(h)
    }

    /// A handle from before [`LlBuffer::poison`] points at rows and metadata the fill overwrote.
    fn check_not_poisoned(&self, h: &Handle) -> Result<()> {
        if h.generation <= self.poisoned_after {
            return Err(Error::StaleHandle {
                reason: format!(
                    "the buffer was poisoned after dispatch #{}, so dispatch #{}'s rows and metadata are gone",
                    self.poisoned_after, h.generation
                ),
            });
        }
        Ok(())
    }

    fn view<T>(&self, h: &Handle, off: u64, len: usize) -> HeapView<'_, T> {
        HeapView::new(self.heap.local_ptr() + self.half_off(h.half) + off, len)
    }

    /// Received rows per local expert, `i32 [E_local]` (rows `0..count` of each expert are valid).
    pub fn recv_count(&self, h: &Handle) -> Result<HeapView<'_, i32>> {
        self.check_view(h)?;
        Ok(self.view(h, self.hl.recv_count, self.epr()))
    }

    /// Source of each received row, `u32 [E_local, R * T]`: `rank << 24 | slot << 16 | token`.
    pub fn recv_src_info(&self, h: &Handle) -> Result<HeapView<'_, u32>> {
        self.check_view(h)?;
        Ok(self.view(h, self.hl.recv_meta, self.epr() * self.rows_per_expert()))
    }

    /// FP8 rows `u8 [E_local, R * T, H]`.
    pub fn recv_x_fp8(&self, h: &Handle) -> Result<HeapView<'_, u8>> {
        self.check_view(h)?;
        if !matches!(h.payload, Payload::Fp8(_)) {
            return Err(Error::invalid("handle", "the dispatch sent BF16; use recv_x_bf16"));
        }
        Ok(self.view(h, self.hl.recv_x, self.epr() * self.rows_per_expert() * self.cfg.hidden))
    }

    /// BF16 rows `bf16 [E_local, R * T, H]`.
    pub fn recv_x_bf16(&self, h: &Handle) -> Result<HeapView<'_, bf16>> {
        self.check_view(h)?;
        if h.payload != Payload::Bf16 {
            return Err(Error::invalid("handle", "the dispatch sent FP8; use recv_x_fp8"));
        }
        Ok(self.view(h, self.hl.recv_x, self.epr() * self.rows_per_expert() * self.cfg.hidden))
    }

    /// Rows per expert in the column-major scale layout: `R * T` rounded up to a multiple of 4
    /// (the `M` of [`ScaleLayout::ColumnMajor`]).
    pub fn scale_rows(&self) -> usize {
        ll_scale_rows(self.g.world() as u64, self.cfg.max_tokens_per_rank as u64) as usize
    }

    /// Rows of a scale view: `R * T` row-major, [`LlBuffer::scale_rows`] column-major.
    fn scale_view_rows(&self, h: &Handle) -> usize {
        match h.scale_layout {
            ScaleLayout::RowMajor => self.rows_per_expert(),
            ScaleLayout::ColumnMajor => self.scale_rows(),
        }
    }

    /// f32 scales (F32 and F32Pow2 formats): `[E_local, R * T, H / 128]` row-major, or
    /// `[E_local, H / 128, M]` column-major ([`ScaleLayout`]).
    pub fn recv_scales(&self, h: &Handle) -> Result<HeapView<'_, f32>> {
        self.check_view(h)?;
        match h.payload {
            Payload::Fp8(ScaleFormat::F32 | ScaleFormat::F32Pow2) => {
                Ok(self.view(h, self.hl.recv_scales, self.epr() * self.scale_view_rows(h) * self.cfg.hidden / FP8_GROUP))
            }
            _ => Err(Error::invalid("handle", "the dispatch has no f32 scales (BF16 or UE8M0)")),
        }
    }

    /// Packed UE8M0 scales: `u32 [E_local, R * T, ceil(H / 512)]` row-major (byte `g` of a row
    /// is group `g`), or `u32 [E_local, ceil(H / 512), M]` column-major ([`ScaleLayout`]).
    pub fn recv_scales_ue8m0(&self, h: &Handle) -> Result<HeapView<'_, u32>> {
        self.check_view(h)?;
        if h.payload != Payload::Fp8(ScaleFormat::Ue8m0) {
            return Err(Error::invalid("handle", "the dispatch did not use UE8M0 scales"));
        }
        let words = (self.cfg.hidden / FP8_GROUP).div_ceil(4);
        Ok(self.view(h, self.hl.recv_scales, self.epr() * self.scale_view_rows(h) * words))
    }

    /// The zero-copy combine input `bf16 [E_local, R * T, H]` for `h`'s combine: the caller's
    /// kernels may write expert outputs here and combine with [`CombineInput::ZeroCopy`].
    pub fn combine_input(&self, h: &Handle) -> Result<HeapView<'_, bf16>> {
        self.check_view(h)?;
        Ok(self.view(h, self.hl.comb_in, self.epr() * self.rows_per_expert() * self.cfg.hidden))
    }

    /// Combine: expert outputs back to their homes, per expert or pre-reduced ([`CombineMode`]).
    /// In hook mode returns the pending receive half.
    /// Takes `&self`: it leaves the received rows intact, so views of them may be its inputs.
    pub fn combine<'a>(&self, stream: &Arc<CudaStream>, h: &Handle, args: &CombineArgs<'a>) -> Result<(Option<CombinePending<'a>>, CudaEvent)> {
        self.check_received(h)?;
        let half = (self.combines.get() % 2) as usize;
        if let Some((seq, _)) = self.pending_combine.get()[half] {
            return Err(Error::PendingHook {
                reason: format!(
                    "combine #{seq}'s receive hook has not run and this combine would reuse its buffer half (two may be pending; LlBuffer::recover_pending_hooks drains a dropped hook)"
                ),
            });
        }
        let (n, hd) = (h.num_tokens, self.cfg.hidden);
        let k = self.check_routing(&args.topk_idx, n)?;
        if k != h.k {
            return Err(Error::invalid("topk_idx", format!("has k = {k} but the dispatch used k = {}", h.k)));
        }
        let weights = match (args.mode, args.topk_weights) {
            (CombineMode::PerExpert, Some(w)) => {
                check_len("topk_weights", w.elems(), n * k, || format!("[{n}, {k}] f32"))?;
                w.device_addr()
            }
            (CombineMode::PerExpert, None) => return Err(Error::invalid("topk_weights", "the per-expert combine needs [N, K] weights")),
            (CombineMode::PreReduced, Some(_)) => {
                return Err(Error::invalid(
                    "topk_weights",
                    "a pre-reduced combine uses the weights its dispatch carried; pass None (or combine per expert)",
                ));
            }
            (CombineMode::PreReduced, None) if !h.has_weights => {
                return Err(Error::invalid("mode", "a pre-reduced combine needs a dispatch that carried topk_weights (DispatchArgs::topk_weights)"));
            }
            (CombineMode::PreReduced, None) => 0,
        };
        check_len("out", args.out.elems(), n * hd, || format!("[{n}, {hd}] bf16"))?;
        let y = match args.x {
            CombineInput::Tensor(t) => {
                let want = self.epr() * self.rows_per_expert() * hd;
                check_len("x", t.elems(), want, || format!("[{}, {}, {hd}] bf16", self.epr(), self.rows_per_expert()))?;
                t.device_addr()
            }
            CombineInput::ZeroCopy => self.heap.local_ptr() + self.half_off(h.half) + self.hl.comb_in,
        };
        let heap = self.heap.local_ptr()..self.heap.local_ptr() + self.heap.bytes() as u64;
        let y_in_heap = heap.contains(&y) && heap.contains(&(y + (self.epr() * self.rows_per_expert() * hd * 2) as u64 - 1));
        let p = LlCombineParams {
            wait: self.g.wait_ctx(),
            ranks: self.ranks(),
            layout: self.hl,
            dispatch_half_off: self.half_off(h.half),
            combine_half_off: self.half_off(half),
            y,
            topk_idx: args.topk_idx.addr(),
            topk_weights: weights,
            out: args.out.device_addr(),
            num_tokens: n as u32,
            hidden: hd as u32,
            k: k as u32,
            idx_i64: args.topk_idx.is_i64(),
            experts_per_rank: self.epr() as u32,
            max_tokens: self.cfg.max_tokens_per_rank as u32,
            half: half as u32,
            stages: if args.hook { stage::SEND } else { stage::SEND | stage::RECV },
            send_blocks: self.cfg.num_blocks,
            slot_k: self.cfg.max_topk as u32,
            mode: match args.mode {
                CombineMode::PerExpert => combine_mode::PER_EXPERT,
                CombineMode::PreReduced => combine_mode::PRE_REDUCED,
            },
            any_put: self.any_put(),
            y_in_heap: y_in_heap as u32,
            _pad: 0,
            trace: self.trace_addr(1),
        };
        let streams = [
            (
                "x",
                match args.x {
                    CombineInput::Tensor(t) => t.owning_stream(),
                    CombineInput::ZeroCopy => None,
                },
            ),
            ("topk_idx", args.topk_idx.owning_stream()),
            ("topk_weights", args.topk_weights.and_then(|w| w.owning_stream())),
            ("out", args.out.owning_stream()),
        ];
        self.g.ordered(stream, &streams, || self.launch_combine(stream, &p))?;
        self.combines.set(self.combines.get() + 1);
        let seq = self.combines.get();
        let mut pc = self.pending_combine.get();
        pc[half] = args.hook.then_some((seq, LlCombineParams { stages: stage::RECV, ..p }));
        self.pending_combine.set(pc);
        let pending = args.hook.then_some(CombinePending {
            buffer: self.heap.id(),
            params: LlCombineParams { stages: stage::RECV, ..p },
            // The receive half reads the routing and weights and writes the output.
            streams: streams[1..].iter().filter_map(|&(name, st)| st.map(|st| (name, st.clone()))).collect(),
            seq,
            done: false,
            _args: PhantomData,
        });
        Ok((pending, self.event(stream)?))
    }

    /// The receive half of a hook-mode combine. A refused call (another buffer's pending
    /// combine, or one whose receive half already ran) leaves `pending` as it was.
    pub fn combine_recv(&self, stream: &Arc<CudaStream>, pending: &mut CombinePending<'_>) -> Result<CudaEvent> {
        self.check_own(pending.buffer)?;
        if pending.done {
            return Err(Error::StaleHandle { reason: "this combine's receive half has already run".into() });
        }
        let half = pending.params.half as usize;
        let mut pc = self.pending_combine.get();
        if pc[half].map(|(seq, _)| seq) != Some(pending.seq) {
            return Err(Error::StaleHandle { reason: "this combine's receive half was drained by LlBuffer::recover_pending_hooks".into() });
        }
        let streams: Vec<ArgStream<'_>> = pending.streams.iter().map(|(name, st)| (*name, Some(st))).collect();
        self.g.ordered(stream, &streams, || self.launch_combine(stream, &pending.params))?;
        pending.done = true;
        pc[half] = None;
        self.pending_combine.set(pc);
        self.event(stream)
    }

    fn launch_combine(&self, stream: &Arc<CudaStream>, p: &LlCombineParams) -> Result<()> {
        self.g.follow(&self.chain, stream)?;
        let smem = ll_combine_smem_bytes(self.epr() as u32, self.g.world() as u32);
        self.launch(Kernel::LlCombine, smem, stream, p)
    }

    /// Launches `k` from the group's module, or, when some rank is reached through NVSHMEM
    /// calls ([`LlBuffer::put_ranks`]), from the NVSHMEM module the heap's memory belongs to.
    fn launch<P: KernelParams>(&self, k: Kernel, smem: u32, stream: &CudaStream, p: &P) -> Result<()> {
        let (blocks, threads) = (self.cfg.num_blocks, self.cfg.threads);
        if self.heap.put_ranks().is_empty() {
            self.g.launch(k, blocks, threads, smem, stream, p)
        } else {
            self.g.launch_function(k, self.heap.kernel(k)?, blocks, threads, smem, stream, p)
        }
    }

    /// Finishes hook-mode calls whose receive hooks were dropped without being called, which
    /// would otherwise leave the buffer refusing every later call with `PendingHook` (and the
    /// peers waiting on this rank). A pending dispatch's receive half runs on `stream` (its rows
    /// land in the buffer; statistics are not counted); a pending combine's receive half is
    /// drained: it waits for the peers' rows and resets the arrival counters, and writes no
    /// output. A hook object kept after this is refused (`StaleHandle`). Returns whether a
    /// dispatch and whether a combine were finished.
    pub fn recover_pending_hooks(&mut self, stream: &Arc<CudaStream>) -> Result<(bool, bool)> {
        let mut done = (false, false);
        // Oldest first, as the hooks would have run.
        let mut dispatches: Vec<(usize, (u64, Payload, ScaleLayout))> =
            self.pending_dispatch.iter().enumerate().filter_map(|(half, p)| p.map(|p| (half, p))).collect();
        dispatches.sort_by_key(|(_, (g, ..))| *g);
        for (half, (generation, payload, scale_layout)) in dispatches {
            let mut h =
                Handle { buffer: self.heap.id(), generation, half, num_tokens: 0, k: 0, payload, scale_layout, has_weights: false, received: false };
            self.dispatch_recv(stream, &mut h, None)?;
            done.0 = true;
        }
        let mut combines: Vec<(usize, (u64, LlCombineParams))> =
            self.pending_combine.get().iter().enumerate().filter_map(|(half, p)| p.map(|p| (half, p))).collect();
        combines.sort_by_key(|(_, (seq, _))| *seq);
        for (half, (_, p)) in combines {
            // Drain: no output, so nothing of the abandoned call's arguments is touched.
            let p = LlCombineParams { out: 0, topk_idx: 0, topk_weights: 0, y: 0, ..p };
            self.launch_combine(stream, &p)?;
            let mut pc = self.pending_combine.get();
            pc[half] = None;
            self.pending_combine.set(pc);
            done.1 = true;
        }
        Ok(done)
    }

    /// Collective: fills the receive rows, scales and metadata of both halves with `byte` (a
    /// debugging aid), then meets every rank at a GPU barrier, so no peer writes before the
    /// fill. Counters are left alone. Every rank calls it at the same point between calls.
    /// Every handle of an earlier dispatch is stale from then on (its metadata is overwritten).
    pub fn poison(&mut self, stream: &Arc<CudaStream>, byte: u8) -> Result<()> {
        // Its barrier meets the peers through the heap's peer table by direct stores, which
        // cannot reach a put rank (its entry is this rank's own base).
        if !self.heap.put_ranks().is_empty() {
            return Err(Error::invalid(
                "poison",
                format!(
                    "this buffer reaches ranks {:?} through NVSHMEM calls, and poison's barrier cannot: not supported there",
                    self.heap.put_ranks()
                ),
            ));
        }
        // A pending receive half reads the metadata the fill overwrites, and a poisoned handle
        // could then never be received or recovered: finish or recover the hooks first.
        if self.pending_dispatch.iter().any(Option::is_some) || self.pending_combine.get().iter().any(Option::is_some) {
            return Err(Error::PendingHook {
                reason: "poison while a hook-mode receive half is pending (call the hook, or LlBuffer::recover_pending_hooks, first)".into(),
            });
        }
        self.poisoned_after = self.dispatches;
        self.fill_received(stream, byte)?;
        self.g.launch_barrier_on(stream, &self.heap, 1, 0)
    }

    /// Testing: fills the receive rows and metadata like [`LlBuffer::poison`] but keeps every
    /// handle valid, as memory overwritten under the buffer would: a combine then reads corrupt
    /// indices, which the kernels must report ([`Error::BadIndex`]) instead of following.
    #[cfg(feature = "testing")]
    pub fn corrupt_received_for_testing(&self, stream: &Arc<CudaStream>, byte: u8) -> Result<()> {
        self.fill_received(stream, byte)
    }

    fn fill_received(&self, stream: &Arc<CudaStream>, byte: u8) -> Result<()> {
        self.g.follow(&self.chain, stream)?;
        for half in 0..2 {
            let base = self.heap.local_ptr() + self.half_off(half);
            let bytes = (self.hl.slot_counter - self.hl.recv_x) as usize;
            // SAFETY: the range lies inside this rank's heap, before the counters.
            unsafe { crate::driver::memset_d8_async(base + self.hl.recv_x, byte, bytes, stream) }
                .during("cuMemsetD8Async", || "poisoning the receive buffer".into())?;
        }
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
