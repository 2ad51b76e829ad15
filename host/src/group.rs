//! The communicator: one member per GPU, in one of two modes.
//!
//! - **Processes**: one process per GPU; ranks meet over TCP ([`ProcessConfig`], torchrun's
//!   environment variables) and share memory with CUDA IPC.
//! - **Threads**: one process drives several GPUs, one thread per rank
//!   ([`Group::run_threads`]); ranks meet in memory and share plain pointers.
//!
//! A group owns the CUDA context of its device (event tracking off: every operation is
//! ordered by the stream it is given), the loaded kernels, the rank's device error record and a
//! small control heap for barriers.

use crate::driver::{self, DeviceAlloc, Module};
use crate::error::{DriverContext, Error, Result};
use crate::heap::{Mode, Quarantine, SymmetricHeap};
use crate::rendezvous::{Exchange, LocalExchange, ProcessConfig, TcpExchange};
use crate::watchdog::{self, FailureKind, Health, PeerFailure, Watchdog};
use crate::work::OwnWork;
use cudarc::driver::{CudaContext, CudaStream, sys};
use moe_ep_kernels::abi::{self, CONTROL_BYTES, ERROR_RECORD_CLEAR, ErrorRecord, GROUP_MAX_RANKS, KernelParams, WaitCtx};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The PTX of all kernels, embedded at compile time: `host/kernels.ptx`, generated from
/// `kernels/` by `cargo xtask build-ptx` and checked in (CI fails when it is stale), so the
/// library builds on stable Rust with no CUDA toolkit.
pub const PTX: &str = include_str!("../kernels.ptx");

/// Group-wide settings.
#[derive(Clone, Copy, Debug)]
pub struct GroupConfig {
    /// Deadline of every GPU spin-wait (a peer that never arrives becomes an error).
    pub timeout: Duration,
    /// Deadline of every host-side rendezvous step.
    pub rendezvous_timeout: Duration,
    /// Several process ranks may use one GPU (`MOE_EP_SHARE_GPU=1` through
    /// [`GroupConfig::with_env`]). Every rank on a shared GPU must opt in, and the CUDA MPS
    /// control daemon should be running (`nvidia-cuda-mps-control -d`): without it the
    /// processes take turns on the GPU and every cross-rank wait costs milliseconds. Off: two
    /// ranks on one GPU are refused. Threads of one process never share a GPU (they would share
    /// one CUDA context, whose synchronising calls wait for the other ranks' kernels). For
    /// testing and development: ranks sharing a GPU say nothing about NVLink speed.
    pub share_gpu: bool,
    /// SMs this rank's kernels may use (`MOE_EP_SM_BUDGET`); 0: every SM the rank's CUDA
    /// context may use, or, on a shared GPU, the rank's share ([`Group::sm_count`]).
    pub sm_budget: u32,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig { timeout: Duration::from_secs(10), rendezvous_timeout: Duration::from_secs(60), share_gpu: false, sm_budget: 0 }
    }
}

/// The environment variable that opts a process into sharing its GPU ([`GroupConfig::share_gpu`]).
pub const SHARE_GPU_ENV: &str = "MOE_EP_SHARE_GPU";
/// The environment variable that sets [`GroupConfig::sm_budget`].
pub const SM_BUDGET_ENV: &str = "MOE_EP_SM_BUDGET";
/// The environment variable that names this rank's node ([`Group::nodes`]), where the kernel's
/// boot id (the same in every container of one host) does not say it: ranks with the same value
/// are on one node. For testing, it makes processes on one machine stand for several nodes.
pub const NODE_ENV: &str = "MOE_EP_NODE";

/// This process's node: [`NODE_ENV`], else the kernel's boot id, else the host name.
fn node_name() -> String {
    if let Ok(v) = std::env::var(NODE_ENV)
        && !v.trim().is_empty()
    {
        return format!("{NODE_ENV}={}", v.trim());
    }
    for f in ["/proc/sys/kernel/random/boot_id", "/proc/sys/kernel/hostname"] {
        if let Ok(s) = std::fs::read_to_string(f)
            && !s.trim().is_empty()
        {
            return format!("{f}: {}", s.trim());
        }
    }
    "no node name".into()
}

/// Every rank's node, numbered in the order of each node's first rank, from the all-gathered
/// node names.
fn node_numbers(names: &[Vec<u8>]) -> Vec<u32> {
    let mut seen: Vec<&[u8]> = Vec::new();
    names
        .iter()
        .map(|n| match seen.iter().position(|s| *s == n.as_slice()) {
            Some(i) => i as u32,
            None => {
                seen.push(n);
                seen.len() as u32 - 1
            }
        })
        .collect()
}

impl GroupConfig {
    /// This configuration with the environment's overrides: `MOE_EP_SHARE_GPU` (`1`/`0`) sets
    /// [`GroupConfig::share_gpu`] and `MOE_EP_SM_BUDGET` (an SM count) sets
    /// [`GroupConfig::sm_budget`]. [`Group::from_env`] and the Python package apply them; a
    /// malformed value is an [`Error::InvalidArgument`] naming the variable.
    pub fn with_env(self) -> Result<Self> {
        self.with_vars(|k| std::env::var(k).ok())
    }

    /// [`GroupConfig::with_env`] over any variable source.
    pub fn with_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        if let Some(v) = var(SHARE_GPU_ENV) {
            self.share_gpu = match v.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                other => return Err(Error::invalid(SHARE_GPU_ENV, format!("{other:?} is not 1 or 0"))),
            };
        }
        if let Some(v) = var(SM_BUDGET_ENV) {
            self.sm_budget = v.trim().parse().map_err(|_| Error::invalid(SM_BUDGET_ENV, format!("{v:?} is not an SM count")))?;
        }
        Ok(self)
    }
}

/// The kernel registry: one line per PTX entry (variant, entry name, parameter block, what it
/// does) makes [`Kernel`], its list, names and parameter sizes. The parameter block's
/// [`KernelParams`] impl, next to the block in the ABI, names the entries that take it, and
/// every launch checks that pairing.
macro_rules! kernels {
    ($($(#[doc = $doc:literal])* $variant:ident = $entry:literal, $params:ty;)*) => {
        /// Every kernel of the PTX module.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Kernel {
            /// All kernels.
            pub const ALL: &'static [Kernel] = &[$(Kernel::$variant,)*];

            /// The PTX entry name.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Kernel::$variant => $entry,)*
                }
            }

            /// Size of the kernel's by-value parameter block (the PTX check compares it with the
            /// `.param .b8 [N]` the kernel declares).
            pub const fn param_bytes(self) -> usize {
                match self {
                    $(Kernel::$variant => std::mem::size_of::<$params>(),)*
                }
            }

            /// The entries its parameter block's [`KernelParams`] impl names (this kernel's among
            /// them, checked by a unit test).
            #[cfg(test)]
            fn params_entries(self) -> &'static [&'static str] {
                match self {
                    $(Kernel::$variant => <$params as KernelParams>::ENTRIES,)*
                }
            }
        }
    };
}

kernels! {
    /// Cross-rank barrier.
    Barrier = "barrier", abi::BarrierParams;
    /// Test: writes a rank-tagged pattern into every peer's heap.
    HeapPatternWrite = "heap_pattern_write", abi::PatternParams;
    /// Test: checks the pattern that arrived.
    HeapPatternCheck = "heap_pattern_check", abi::PatternParams;
    /// Probe: P2P copy bandwidth.
    P2pCopy = "p2p_copy", abi::P2pCopyParams;
    /// Probe: flag round trips.
    PingPong = "ping_pong", abi::PingPongParams;
    /// Test: waits for a flag nobody writes (deadline check).
    WaitForever = "wait_forever", abi::WaitTestParams;
    /// Test: every device-layer wrapper on known inputs.
    PtxSelftest = "ptx_selftest", abi::SelftestParams;
    /// High-throughput layout (routing to counts and positions).
    HtLayout = "ht_layout", abi::HtLayoutParams;
    /// High-throughput count exchange.
    HtNotify = "ht_notify", abi::HtNotifyParams;
    /// High-throughput dispatch.
    HtDispatch = "ht_dispatch", abi::HtDispatchParams;
    /// High-throughput combine.
    HtCombine = "ht_combine", abi::HtCombineParams;
    /// Low-latency dispatch (send and receive halves).
    LlDispatch = "ll_dispatch", abi::LlDispatchParams;
    /// Low-latency combine (send and receive halves).
    LlCombine = "ll_combine", abi::LlCombineParams;
}

struct Function {
    raw: sys::CUfunction,
    max_threads: u32,
}

// SAFETY: a CUfunction handle is usable from any thread with its context current; the module
// that owns it lives in the same `Kernels`.
unsafe impl Send for Function {}
// SAFETY: as above; handles are immutable.
unsafe impl Sync for Function {}

/// The loaded module and its functions.
pub(crate) struct Kernels {
    functions: HashMap<Kernel, Function>,
    _module: Module,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let module = Module::load(ctx, PTX)?;
        let smem_optin = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .during("cuDeviceGetAttribute", || "reading the shared-memory limit".into())?;
        let mut functions = HashMap::new();
        for &k in Kernel::ALL {
            let raw = module.function(k.name())?;
            let max_threads = driver::function_attribute(raw, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
                .during("cuFuncGetAttribute", || format!("reading {}'s thread limit", k.name()))? as u32;
            driver::set_function_attribute(raw, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_optin)
                .during("cuFuncSetAttribute", || format!("raising {}'s dynamic shared memory limit", k.name()))?;
            functions.insert(k, Function { raw, max_threads });
        }
        Ok(Kernels { functions, _module: module })
    }
}

/// What a [`Group`] shares among its clones.
struct GroupInner {
    // Field order is drop order: the watchdog stops first (it holds the exchange); the heap
    // meets the other ranks (through `exchange`) and is freed before the kernels, the error
    // record and the context go; the exchange's drop tells the peers this rank left.
    _watchdog: Watchdog,
    heap: SymmetricHeap,
    exchange: Arc<dyn Exchange>,
    err: DeviceAlloc,
    kernels: Kernels,
    stream: Arc<CudaStream>,
    /// Private stream of [`Group::poll_error`]'s copies (never waits for other work).
    poll_stream: Arc<CudaStream>,
    /// The end of this rank's latest work on every stream it launched on.
    work: Arc<OwnWork>,
    /// This group's heaps dropped without `destroy`, until every rank has let go of them.
    quarantine: Arc<Quarantine>,
    /// The first failure (every later launch is refused with [`Error::GroupFailed`]) and the
    /// abort flag every GPU wait polls.
    health: Arc<Health>,
    _peer_ctxs: Vec<Arc<CudaContext>>,
    ctx: Arc<CudaContext>,
    rank: usize,
    world: usize,
    devices: Vec<usize>,
    mode: Mode,
    cfg: GroupConfig,
    device_name: String,
    /// SMs this rank's kernels may use ([`SmShare`]).
    sm_count: u32,
    /// SMs the device reports to this rank's context.
    sm_total: u32,
    /// Where `sm_count` comes from, in words.
    sm_source: String,
    /// Ranks on this rank's GPU (itself included).
    gpu_sharers: usize,
    /// Every rank's node ([`Group::nodes`]).
    nodes: Vec<u32>,
}

/// One rank of a group: its GPU, stream, kernels and control heap. Cheap to clone (the clones
/// share one rank), so buffers and model layers own theirs: the group lives until its last
/// clone, and so until every buffer built on it, is dropped.
#[derive(Clone)]
pub struct Group {
    inner: Arc<GroupInner>,
}

impl Group {
    /// Joins a multi-process group configured by torchrun's environment variables (see
    /// [`ProcessConfig::from_env`]). Where the process sees exactly one GPU (Slurm's
    /// `--gpus-per-task=1`, a Kubernetes device plugin, `CUDA_VISIBLE_DEVICES=<one>`), that GPU
    /// is the rank's, whatever `LOCAL_RANK` says.
    /// The environment's `MOE_EP_SHARE_GPU` and `MOE_EP_SM_BUDGET` override `cfg`
    /// ([`GroupConfig::with_env`]).
    pub fn from_env(cfg: GroupConfig) -> Result<Group> {
        let cfg = cfg.with_env()?;
        let mut pc = ProcessConfig::from_env()?;
        if driver::driver_present() && CudaContext::device_count().is_ok_and(|n| n == 1) {
            pc.device = 0;
        }
        Group::connect(&pc, cfg)
    }

    /// Joins a multi-process group (one process per GPU).
    pub fn connect(pc: &ProcessConfig, cfg: GroupConfig) -> Result<Group> {
        pc.validate()?;
        let ctx = open_device(pc.device)?;
        let exchange: Arc<dyn Exchange> = Arc::new(TcpExchange::connect(pc, cfg.rendezvous_timeout)?);
        Group::build(ctx, exchange, Mode::Processes, pc.device, cfg)
    }

    /// Joins a multi-process group (one process per GPU, CUDA IPC) over a caller-supplied
    /// exchange, e.g. one built on a serving engine's own store or process group. The
    /// exchange's `all_gather` carries the CUDA IPC handles, so it must only connect this job's
    /// ranks (see [`crate::rendezvous`] on authentication).
    pub fn with_exchange(exchange: Arc<dyn Exchange>, device: usize, cfg: GroupConfig) -> Result<Group> {
        let (rank, world) = (exchange.rank(), exchange.world());
        if world == 0 || world > GROUP_MAX_RANKS || rank >= world {
            return Err(Error::invalid("exchange", format!("rank {rank} of {world}; a group needs 1..={GROUP_MAX_RANKS} ranks")));
        }
        let ctx = open_device(device)?;
        Group::build(ctx, exchange, Mode::Processes, device, cfg)
    }

    /// Runs `f` on `world` ranks, one thread per GPU (devices `0..world`) in this process, and
    /// returns each rank's result.
    pub fn run_threads<T: Send>(world: usize, cfg: GroupConfig, f: impl Fn(&Group) -> Result<T> + Sync) -> Vec<Result<T>> {
        Self::threads_on(world, cfg, f)
    }

    /// One thread per rank, rank `r` on GPU `r`.
    fn threads_on<T: Send>(world: usize, cfg: GroupConfig, f: impl Fn(&Group) -> Result<T> + Sync) -> Vec<Result<T>> {
        if world == 0 || world > GROUP_MAX_RANKS {
            return vec![Err(Error::invalid("world", format!("world size {world} is outside 1..={GROUP_MAX_RANKS}")))];
        }
        let exchanges = LocalExchange::group(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = exchanges
                .into_iter()
                .enumerate()
                .map(|(rank, ex)| {
                    let f = &f;
                    s.spawn(move || -> Result<T> {
                        let ctx = open_device(rank)?;
                        let g = Group::build(ctx, Arc::new(ex), Mode::Threads, rank, cfg)?;
                        f(&g)
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| h.join().unwrap_or_else(|_| Err(Error::Internal { reason: format!("rank {r}'s thread panicked") })))
                .collect()
        })
    }

    fn build(ctx: Arc<CudaContext>, exchange: Arc<dyn Exchange>, mode: Mode, device: usize, cfg: GroupConfig) -> Result<Group> {
        let (rank, world) = (exchange.rank(), exchange.world());
        let to = cfg.rendezvous_timeout;
        // Which GPU each rank drives (its UUID: each process may number the GPUs differently),
        // and whether this rank's GPU reaches every other.
        let me = GpuId { ordinal: device, uuid: driver::peer::uuid(device).during("cuDeviceGetUuid", || format!("identifying GPU {device}"))? };
        let gpus = parse_gpus(&exchange.all_gather_as("device ids", &me.to_bytes(), to)?, rank, world)?;
        // Which ranks share this rank's node: only they map each other's memory (CUDA IPC).
        let nodes = node_numbers(&exchange.all_gather_as("node names", node_name().as_bytes(), to)?);
        let near: Vec<bool> = nodes.iter().map(|&n| n == nodes[rank]).collect();
        let visible = driver::peer::visible_uuids().during("cuDeviceGetUuid", || "listing the GPUs this process sees".into())?;
        // This rank's SMs: its context's limit (CUDA MPS), its MPS share, an explicit budget,
        // or an equal split of a shared GPU.
        let sm_total = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .during("cuDeviceGetAttribute", || "reading the SM count".into())? as u32;
        let sharers = gpus.iter().filter(|g| g.uuid == me.uuid).count();
        let mps_percent = std::env::var("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE").ok().and_then(|v| v.trim().parse::<f64>().ok());
        let sm_share =
            SmShare { total: sm_total, context_limit: driver::exec_affinity_sm_count(&ctx).ok(), mps_percent, sharers, budget: cfg.sm_budget };
        let (share, share_source) = sm_share.resolve()?;
        if sharers > 1 && rank == gpus.iter().position(|g| g.uuid == me.uuid).unwrap_or(rank) && mps_control_pipe().is_none() {
            eprintln!(
                "moe-ep (rank {rank}): {sharers} ranks share {me} but no CUDA MPS control daemon was found (CUDA_MPS_PIPE_DIRECTORY); \
                 without MPS their kernels take turns on the GPU and every cross-rank wait costs milliseconds"
            );
        }
        let mut row = vec![access::YES; world];
        for (r, g) in gpus.iter().enumerate() {
            // A rank on another node never maps this rank's memory: nothing to check.
            if r == rank || !near[r] {
                continue;
            }
            row[r] = match visible.iter().position(|u| *u == g.uuid) {
                Some(local) if local == device => access::YES,
                Some(local) => {
                    let ok = driver::peer::can_access(device, local).during("cuDeviceCanAccessPeer", || format!("checking {me} -> {g}"))?;
                    if ok { access::YES } else { access::NO }
                }
                None => access::NOT_VISIBLE,
            };
        }
        let row = PeerRow { access: row, share_gpu: cfg.share_gpu, sms: share, limit: sm_share.limit() }.to_bytes();
        check_peer_rows(&exchange.all_gather_as("peer access rows", &row, to)?, &gpus, rank, mode)?;
        let devices: Vec<usize> = gpus.iter().map(|g| g.ordinal).collect();
        let mut peer_ctxs = Vec::new();
        if mode == Mode::Threads {
            for (r, &d) in devices.iter().enumerate() {
                if r != rank && d != device {
                    let p = CudaContext::new(d).during("cuDevicePrimaryCtxRetain", || format!("retaining GPU {d}'s context"))?;
                    driver::peer::enable(&ctx, &p).during("cuCtxEnablePeerAccess", || format!("enabling GPU {device} -> GPU {d}"))?;
                    peer_ctxs.push(p);
                }
            }
            ctx.bind_to_thread().during("cuCtxSetCurrent", || "binding the rank's context".into())?;
        }
        let kernels = Kernels::load(&ctx)?;
        let stream = ctx.new_stream().during("cuStreamCreate", || "creating the group's stream".into())?;
        let poll_stream = ctx.new_stream().during("cuStreamCreate", || "creating the error-poll stream".into())?;
        let err = DeviceAlloc::zeroed(&ctx, std::mem::size_of::<ErrorRecord>())?;
        // The waits find the abort flag through the error record.
        let health = Health::new(&ctx, rank)?;
        let rec = ErrorRecord { host: health.device_ptr(), ..Default::default() };
        // SAFETY: `err` is a live allocation of one ErrorRecord; no kernel runs yet.
        unsafe { driver::copy_to_device(&[rec], err.ptr(), &stream) }.during("cuMemcpyHtoDAsync", || "initialising the error record".into())?;
        let work = Arc::new(OwnWork::new(&ctx));
        work.mark(&stream)?;
        let quarantine = Quarantine::new();
        let heap = SymmetricHeap::new(&ctx, &exchange, &quarantine, &work, (mode, &near), CONTROL_BYTES, to)?;
        // From here on, a peer that dies or fails stops this rank's waits at once.
        exchange.watch(watchdog::sink(&health));
        let watchdog = Watchdog::start(health.clone(), exchange.clone())?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Group {
            inner: Arc::new(GroupInner {
                _watchdog: watchdog,
                heap,
                exchange,
                err,
                kernels,
                stream,
                poll_stream,
                work,
                quarantine,
                health,
                _peer_ctxs: peer_ctxs,
                ctx,
                rank,
                world,
                devices,
                mode,
                cfg,
                device_name,
                sm_count: share,
                sm_total,
                sm_source: share_source,
                gpu_sharers: sharers,
                nodes,
            }),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.inner.world
    }

    /// This rank's CUDA device ordinal.
    pub fn device(&self) -> usize {
        self.inner.devices[self.inner.rank]
    }

    /// Every rank's device ordinal, as that rank's own process numbers its GPUs (ranks are
    /// matched by GPU UUID, so `CUDA_VISIBLE_DEVICES` may order the GPUs differently in each
    /// process).
    pub fn devices(&self) -> &[usize] {
        &self.inner.devices
    }

    /// The device's name (e.g. "NVIDIA H200").
    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }

    /// Streaming multiprocessors this rank's kernels may use: the device's, or less where the
    /// rank's CUDA context is limited (CUDA MPS), [`GroupConfig::sm_budget`] is set, or the GPU
    /// is shared ([`Group::gpu_sharers`]). Every kernel's blocks must be resident at once, so no
    /// launch asks for more blocks than this.
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// Streaming multiprocessors the device reports to this rank's CUDA context (under CUDA
    /// MPS with an active-thread percentage, the client's limit rather than the whole GPU).
    pub fn device_sm_count(&self) -> u32 {
        self.inner.sm_total
    }

    /// Where [`Group::sm_count`] comes from, in words (e.g. "an equal split of the GPU's 132
    /// SMs among the 4 ranks on it, less 2 for other kernels").
    pub fn sm_count_source(&self) -> &str {
        &self.inner.sm_source
    }

    /// Ranks of this group on this rank's GPU, itself included: 1 unless
    /// [`GroupConfig::share_gpu`] let several processes share it. Nothing measured with
    /// ranks sharing a GPU says anything about NVLink.
    pub fn gpu_sharers(&self) -> usize {
        self.inner.gpu_sharers
    }

    /// Every rank's node, numbered in the order of each node's first rank (ranks of one node
    /// share the kernel's boot id, or [`NODE_ENV`]). Only ranks of one node map each other's
    /// memory: in a group that spans nodes the GPU barrier, the high-throughput buffers and
    /// low-latency buffers in moe-ep's own heap are refused, and low-latency buffers live in
    /// NVSHMEM's memory (`LlBuffer::with_nvshmem`); [`Group::barrier`] meets the ranks on the host.
    pub fn nodes(&self) -> &[u32] {
        &self.inner.nodes
    }

    /// Whether the group's ranks are on more than one node ([`Group::nodes`]).
    pub fn spans_nodes(&self) -> bool {
        self.inner.nodes.iter().any(|&n| n != self.inner.nodes[0])
    }

    /// The ranks on other nodes than this rank's.
    fn far_ranks(&self) -> Vec<usize> {
        let mine = self.inner.nodes[self.inner.rank];
        (0..self.inner.world).filter(|&r| self.inner.nodes[r] != mine).collect()
    }

    /// How ranks share memory.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// Group settings.
    pub fn config(&self) -> GroupConfig {
        self.inner.cfg
    }

    /// The rendezvous this group was built on (and its timeout), for bootstraps layered on the
    /// group (the NVSHMEM spike).
    #[cfg_attr(not(feature = "nvshmem"), allow(dead_code))]
    pub(crate) fn exchange(&self) -> (&Arc<dyn Exchange>, Duration) {
        (&self.inner.exchange, self.inner.cfg.rendezvous_timeout)
    }

    /// The device's context (allocate inputs and outputs with it; event tracking is off).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The group's own stream (used by [`Group::barrier`] and the diagnostics).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// Host-side barrier through the rendezvous.
    pub fn host_barrier(&self) -> Result<()> {
        self.inner.exchange.barrier(self.inner.cfg.rendezvous_timeout)
    }

    /// All-gather of small blobs through the rendezvous (e.g. an NCCL id, benchmark results).
    pub fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.inner.exchange.all_gather_as("Group::all_gather_bytes", data, self.inner.cfg.rendezvous_timeout)
    }

    /// Collective: checks that every rank passed the same `value` (a configuration's canonical
    /// text); a mismatch is an [`Error::CollectiveMismatch`] naming this rank's and the first
    /// differing rank's values, on every rank.
    pub fn agree(&self, what: &'static str, value: &str) -> Result<()> {
        let all = self.inner.exchange.all_gather_as(what, value.as_bytes(), self.inner.cfg.rendezvous_timeout)?;
        match all.iter().position(|v| v.as_slice() != value.as_bytes()) {
            None => Ok(()),
            Some(r) => Err(Error::CollectiveMismatch {
                what,
                rank: self.inner.rank,
                value: value.into(),
                other_rank: r,
                other_value: String::from_utf8_lossy(&all[r]).into_owned(),
            }),
        }
    }

    /// Collective: the smallest [`Group::sm_count`] of every rank (the grid every rank can
    /// launch, e.g. for `HtConfig::fit_sms` where ranks' shares may differ).
    pub fn min_sm_count(&self) -> Result<u32> {
        let all = self.inner.exchange.all_gather_as("SM counts", &self.inner.sm_count.to_le_bytes(), self.inner.cfg.rendezvous_timeout)?;
        all.iter()
            .enumerate()
            .map(|(r, b)| {
                <[u8; 4]>::try_from(b.as_slice()).map(u32::from_le_bytes).map_err(|_| Error::Rendezvous {
                    rank: self.inner.rank,
                    world: self.inner.world,
                    reason: format!("rank {r} sent a malformed SM count ({} bytes)", b.len()),
                })
            })
            .try_fold(u32::MAX, |m, c| c.map(|c| m.min(c)))
    }

    /// GPU barrier across all ranks on the group's stream, then [`Group::check`]. In a group
    /// that spans nodes ([`Group::spans_nodes`]), [`Group::check`] (this rank's kernels done),
    /// then every rank meets on the host.
    pub fn barrier(&self) -> Result<()> {
        if self.spans_nodes() {
            self.ensure_healthy()?;
            self.check()?;
            return self.inner.exchange.barrier(self.inner.cfg.rendezvous_timeout).inspect_err(|e| self.fail(e));
        }
        self.launch_barrier(&self.inner.stream, 1)?;
        self.check()
    }

    /// Enqueues `iters` back-to-back GPU barriers (one launch) on `stream`, on the group's
    /// control heap (every rank must issue the group's barriers in the same order).
    pub fn launch_barrier(&self, stream: &CudaStream, iters: u32) -> Result<()> {
        self.launch_barrier_on(stream, &self.inner.heap, iters, 0)
    }

    /// [`Group::launch_barrier`] that first waits `hold_ns` on the GPU (benchmarks: see
    /// `crate::diag::launch_held_barrier`).
    #[cfg(feature = "testing")]
    pub(crate) fn launch_held_barrier(&self, stream: &CudaStream, hold_ns: u32) -> Result<()> {
        self.launch_barrier_on(stream, &self.inner.heap, 1, hold_ns)
    }

    /// Keeps `stream` busy for `hold_ns` on the GPU, meeting no other rank (the barrier kernel
    /// with no barrier: `crate::diag::launch_gpu_sleep`).
    #[cfg(feature = "testing")]
    pub(crate) fn launch_gpu_sleep(&self, stream: &CudaStream, hold_ns: u32) -> Result<()> {
        self.launch_barrier_on(stream, &self.inner.heap, 0, hold_ns)
    }

    /// A GPU barrier whose epochs live in `heap` (each buffer has its own, so barriers of
    /// different buffers never pair up across ranks), `iters` times, after waiting `hold_ns`
    /// on the GPU (`BarrierParams::hold_ns`; 0 for none).
    /// A heap with ranks on other nodes, or reached through NVSHMEM calls, is refused: the
    /// barrier stores directly.
    pub(crate) fn launch_barrier_on(&self, stream: &CudaStream, heap: &SymmetricHeap, iters: u32, hold_ns: u32) -> Result<()> {
        if !heap.far_ranks().is_empty() {
            return Err(Error::invalid(
                "group",
                format!(
                    "a GPU barrier reaches the ranks of one node, and ranks {:?} are on other nodes (Group::barrier meets them on the host)",
                    heap.far_ranks()
                ),
            ));
        }
        if !heap.put_ranks().is_empty() {
            return Err(Error::invalid(
                "heap",
                format!(
                    "a barrier over a heap that reaches ranks {:?} through NVSHMEM calls (the barrier stores directly): not supported",
                    heap.put_ranks()
                ),
            ));
        }
        let p = moe_ep_kernels::abi::BarrierParams { wait: self.wait_ctx(), ranks: heap.rank_table(), slots: heap.barrier_slots(), iters, hold_ns };
        // A warp per 32 ranks, at most 8 (each thread serves every block-size-th rank).
        let block = (self.inner.world as u32).div_ceil(32).clamp(1, 8) * 32;
        self.launch(Kernel::Barrier, 1, block, 0, stream, &p)
    }

    /// Waits until every kernel this rank launched has finished (polling its own events, with a
    /// deadline of the group's GPU timeout plus 1 s: never the whole context, whose other
    /// streams, torch's or NCCL's, may wait forever), then turns the rank's device error record
    /// into an error (and clears it). A kernel that timed out or met bad input has already
    /// returned; this is where the host learns what happened. Work queued ahead of this rank's
    /// kernels on their streams that outlasts the deadline is an [`Error::HostWaitTimeout`].
    /// Any error fails the group. To look without waiting, use [`Group::poll_error`] or
    /// [`Group::failure`].
    pub fn check(&self) -> Result<()> {
        self.check_inner().inspect_err(|e| self.fail(e))
    }

    /// Waits (deadline: the GPU timeout plus 1 s) for every kernel this rank launched so far.
    pub(crate) fn wait_own_work(&self, what: &str) -> Result<()> {
        self.inner.work.wait(self.inner.rank, what, self.inner.cfg.timeout + Duration::from_secs(1))
    }

    /// Notes that this rank just queued work on `stream` outside [`Group::launch`] (a fill, a
    /// copy), so that waits for its own work cover it.
    pub(crate) fn mark(&self, stream: &CudaStream) -> Result<()> {
        self.inner.work.mark(stream)
    }

    /// Orders a buffer's next launch on `stream` after its previous one (see [`crate::work::StreamChain`]).
    pub(crate) fn follow(&self, chain: &crate::work::StreamChain, stream: &CudaStream) -> Result<()> {
        chain.follow(&self.inner.work, stream)
    }

    fn check_inner(&self) -> Result<()> {
        self.wait_own_work("check (waiting for its kernels)")?;
        let s = &self.inner.poll_stream;
        let mut rec = [ErrorRecord::default()];
        // SAFETY: the record is a live allocation of one ErrorRecord.
        unsafe { driver::copy_to_host(self.inner.err.ptr(), &mut rec, s) }.during("cuMemcpyDtoH", || "reading the error record".into())?;
        match Error::from_record(&rec[0]).map(|e| self.explain(e)) {
            None => Ok(()),
            Some(e) => {
                // SAFETY: the record is a live allocation; none of this rank's kernels runs
                // (waited for above). (All but the flags' address.)
                unsafe { driver::memset_d8_async(self.inner.err.ptr(), 0, ERROR_RECORD_CLEAR, s) }
                    .during("cuMemsetD8", || "clearing the error record".into())?;
                s.synchronize().during("cuStreamSynchronize", || "clearing the error record".into())?;
                Err(e)
            }
        }
    }

    /// Polls this rank's device error record without waiting for any kernel (a 64-byte copy on
    /// a private stream; other streams keep running). `Ok(None)`: nothing reported so far.
    /// `Ok(Some(e))`: a kernel reported `e`; the record stays set, so [`Group::check`] (which
    /// synchronises the whole context) returns it again and clears it. Cheap enough to call
    /// between the steps of a serving loop.
    pub fn poll_error(&self) -> Result<Option<Error>> {
        let read = || -> Result<ErrorRecord> {
            let mut rec = [ErrorRecord::default()];
            // SAFETY: the record is a live allocation of one ErrorRecord; reading it while a
            // kernel may write it is a race only on its values, which are checked below.
            unsafe { driver::copy_to_host(self.inner.err.ptr(), &mut rec, &self.inner.poll_stream) }
                .during("cuMemcpyDtoHAsync", || "polling the error record".into())?;
            Ok(rec[0])
        };
        if read()?.status == moe_ep_kernels::abi::status::OK {
            return Ok(None);
        }
        // The reporting thread publishes `status` last: a second read, issued after the first
        // saw it, sees every field the reporter wrote.
        let e = Error::from_record(&read()?).map(|e| self.explain(e));
        if let Some(e) = &e {
            self.fail(e);
        }
        Ok(e)
    }

    /// A `PeerFailed` from the device names only the culprit and a reason code: the host's
    /// watchdog knows what happened.
    fn explain(&self, e: Error) -> Error {
        match e {
            Error::PeerFailed { rank, peer, phase, .. } if self.inner.health.abort_cause().is_some() => {
                Error::PeerFailed { rank, peer, phase, cause: self.inner.health.abort_cause().unwrap_or_default() }
            }
            e => e,
        }
    }

    /// Marks the group failed by `e` (the first cause is kept) and, when `e` is this rank's
    /// own failure, tells the peers, so that they stop waiting for this rank now rather than
    /// at their deadline.
    pub(crate) fn fail(&self, e: &Error) {
        if matches!(e, Error::GroupFailed { .. }) {
            return;
        }
        let h = &self.inner.health;
        let own = !matches!(e, Error::PeerFailed { .. });
        if h.fail(e.to_string(), own) && own {
            h.announce(&*self.inner.exchange, FailureKind::Error, e.to_string());
        }
    }

    /// Aborts the group on every rank: this rank's GPU waits, and within milliseconds every
    /// peer's, stop with [`Error::PeerFailed`] naming this rank and `reason`, and every later
    /// operation on the group (on any rank) returns [`Error::GroupFailed`]. Use it when this
    /// rank cannot go on (a failed request, a shutdown) and its peers must not wait for it
    /// until their deadline. The group cannot be resumed: drop it and build a new one.
    pub fn abort(&self, reason: &str) {
        let h = &self.inner.health;
        h.raise(&PeerFailure { rank: self.inner.rank, kind: FailureKind::Aborted, detail: reason.to_string() });
        h.announce(&*self.inner.exchange, FailureKind::Aborted, reason.to_string());
    }

    /// The error that failed the group, if one did (see [`Error::GroupFailed`]): a peer that
    /// died, failed or aborted, or an error this rank's kernels reported (read from host-mapped
    /// memory the device writes: no copy and no synchronisation, so it is cheap to call between
    /// CUDA-graph replays, which cannot consult the host). After the work of a step has finished
    /// (a stream synchronisation or an event), `None` means none of its kernels met an error or a
    /// failed peer, so its outputs can be used; `Some` means they must not be. The first call
    /// that finds an error of this rank's own kernels also tells the peers (once; the watchdog
    /// thread would within 5 ms).
    pub fn failure(&self) -> Option<String> {
        let f = self.inner.health.failure();
        if f.is_some() {
            // This rank's own device error, seen here first: the peers hear of it now, not at
            // the watchdog's next look (nor as a bare goodbye if the group is dropped before).
            self.inner.health.announce_reported(&*self.inner.exchange);
        }
        f
    }

    /// `Err(GroupFailed)` once a device error or timeout has failed the group.
    pub(crate) fn ensure_healthy(&self) -> Result<()> {
        match self.failure() {
            None => Ok(()),
            Some(cause) => Err(Error::GroupFailed { cause }),
        }
    }

    /// The wait context every kernel of this rank gets.
    pub(crate) fn wait_ctx(&self) -> WaitCtx {
        self.wait_ctx_with(self.inner.cfg.timeout)
    }

    pub(crate) fn wait_ctx_with(&self, timeout: Duration) -> WaitCtx {
        WaitCtx {
            err: self.inner.err.ptr(),
            timeout_ns: timeout.as_nanos().min(u64::MAX as u128) as u64,
            rank: self.inner.rank as u32,
            world: self.inner.world as u32,
        }
    }

    /// The control heap's bases for the test kernels that take them by value (at most
    /// `MAX_RANKS` ranks; `what` names the kernel in the error past that).
    #[cfg(feature = "testing")]
    pub(crate) fn control_peers(&self, what: &str) -> Result<moe_ep_kernels::abi::Peers> {
        self.inner.heap.peers(what)
    }

    /// Collective: releases `heap` on every rank ([`SymmetricHeap::destroy`]); on an error its
    /// memory is quarantined instead. Ranks that destroyed different buffers leave the group
    /// usable; any other error fails it.
    pub(crate) fn destroy_heap(&self, heap: SymmetricHeap) -> Result<()> {
        heap.destroy(self.inner.cfg.timeout + Duration::from_secs(1), self.inner.cfg.rendezvous_timeout).inspect_err(|e| {
            if !matches!(e, Error::CollectiveMismatch { .. }) {
                self.fail(e)
            }
        })
    }

    /// Bytes of this rank's device memory held for buffers that were dropped without
    /// `destroy`: kept until every rank has dropped them (a peer may still write into it), then
    /// freed at the group's next buffer creation or [`Group::reclaim_dropped`].
    pub fn quarantined_bytes(&self) -> usize {
        self.inner.quarantine.bytes()
    }

    /// Collective: frees the memory of every buffer that all ranks have dropped (without
    /// `destroy`) and none of whose kernels still runs; returns the bytes this rank freed.
    /// Buffer creation does the same on its own.
    pub fn reclaim_dropped(&self) -> Result<usize> {
        self.inner.quarantine.reclaim(&self.inner.exchange, &self.inner.work, self.inner.cfg.rendezvous_timeout)
    }

    /// Collective: releases the group's own memory on every rank and ends it. Call it on the
    /// last clone, after every buffer is destroyed or dropped; otherwise it is refused (and
    /// nothing is released). Dropping a group instead runs no collective: its memory, and that
    /// of buffers dropped without `destroy` and not yet reclaimed, is then kept until the
    /// process ends, since a peer may still write into it.
    pub fn destroy(self) -> Result<()> {
        let inner = Arc::try_unwrap(self.inner).map_err(|inner| {
            Error::invalid(
                "group",
                format!(
                    "{} other clones (buffers, layers) still hold rank {}'s group; destroy or drop them first",
                    Arc::strong_count(&inner) - 1,
                    inner.rank
                ),
            )
        })?;
        let g = Group { inner: Arc::new(inner) };
        g.reclaim_dropped()?;
        let inner = Arc::try_unwrap(g.inner).map_err(|_| Error::Internal { reason: "the group was cloned while being destroyed".into() })?;
        let (work_timeout, timeout) = (inner.cfg.timeout + Duration::from_secs(1), inner.cfg.rendezvous_timeout);
        inner.heap.destroy(work_timeout, timeout)
    }

    /// Collective: a heap in symmetric memory another library allocated (see
    /// [`crate::heap::ExternalHeap`]).
    #[cfg_attr(not(feature = "nvshmem"), allow(dead_code))]
    pub(crate) fn adopt_heap(
        &self,
        external: Box<dyn crate::heap::ExternalHeap>,
        (ptr, body): (u64, u64),
        bases: Vec<u64>,
        put: Vec<usize>,
    ) -> Result<SymmetricHeap> {
        self.ensure_healthy()?;
        SymmetricHeap::adopt(
            &self.inner.ctx,
            &self.inner.exchange,
            &self.inner.quarantine,
            &self.inner.work,
            external,
            (ptr, body),
            (bases, put),
            self.inner.cfg.rendezvous_timeout,
        )
    }

    /// Collective: a new symmetric heap of `bytes` per rank for `what` (a buffer, in words).
    /// Refused in a group that spans nodes (the same on every rank): CUDA IPC maps memory
    /// within a node only.
    pub(crate) fn new_heap(&self, bytes: u64, what: &str) -> Result<SymmetricHeap> {
        self.ensure_healthy()?;
        if self.spans_nodes() {
            return Err(Error::invalid(
                "group",
                format!(
                    "{what} lives in moe-ep's own memory, which CUDA IPC maps within a node, and ranks {:?} are on other nodes than rank {}: across nodes only low-latency buffers in NVSHMEM's memory run (LlBuffer::with_nvshmem; in Python ll_transport=\"nvshmem\", the default where the ranks span nodes)",
                    self.far_ranks(),
                    self.inner.rank
                ),
            ));
        }
        let near = vec![true; self.inner.world];
        SymmetricHeap::new(
            &self.inner.ctx,
            &self.inner.exchange,
            &self.inner.quarantine,
            &self.inner.work,
            (self.inner.mode, &near),
            bytes,
            self.inner.cfg.rendezvous_timeout,
        )
    }

    /// Threads per block a launch of `k` asking for `requested` actually gets: the request,
    /// clamped to what the compiled kernel's registers allow, in whole warps.
    pub fn launch_threads(&self, k: Kernel, requested: u32) -> u32 {
        whole_warps(requested, self.inner.kernels.functions[&k].max_threads)
    }

    /// Runs `launch` (an operation's kernel launches on `stream`) ordered against its
    /// arguments' own streams (`args`: each argument's name and stream, see
    /// [`crate::DeviceArg::owning_stream`]): `stream` first waits for each of them, and each then
    /// waits for `stream`. Nothing is added for an argument on `stream` itself, or while
    /// `stream` is being captured into a CUDA graph. The stream, and every argument with a
    /// stream, must belong to this rank's CUDA context (its GPU); anything else is refused
    /// before the launch.
    pub(crate) fn ordered<R>(&self, stream: &CudaStream, args: &[ArgStream<'_>], launch: impl FnOnce() -> Result<R>) -> Result<R> {
        let mine = self.inner.ctx.cu_ctx();
        let foreign = |name: &'static str, ctx: &Arc<CudaContext>| {
            Error::invalid(
                name,
                format!(
                    "belongs to another CUDA context (GPU {}) than rank {}'s (GPU {}); pass memory and streams of the group's GPU",
                    ctx.ordinal(),
                    self.inner.rank,
                    self.inner.ctx.ordinal()
                ),
            )
        };
        if stream.context().cu_ctx() != mine {
            return Err(foreign("stream", stream.context()));
        }
        let mut others: Vec<&Arc<CudaStream>> = Vec::new();
        for (name, a) in args {
            let Some(a) = a else { continue };
            if a.context().cu_ctx() != mine {
                return Err(foreign(name, a.context()));
            }
            if a.cu_stream() != stream.cu_stream() && !others.iter().any(|o| o.cu_stream() == a.cu_stream()) {
                others.push(a);
            }
        }
        let capturing = || stream.capture_status().map(|c| c != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE);
        if others.is_empty() || capturing().during("cuStreamIsCapturing", || "ordering an operation's arguments".into())? {
            return launch();
        }
        for o in &others {
            stream.join(o).during("cuStreamWaitEvent", || "ordering the launch after its arguments' streams".into())?;
        }
        let r = launch()?;
        for o in &others {
            o.join(stream).during("cuStreamWaitEvent", || "ordering the arguments' streams after the launch".into())?;
        }
        Ok(r)
    }

    /// Launches `k` with its parameter block; the block size is clamped to what the compiled
    /// kernel allows (a multiple of 32).
    pub(crate) fn launch<P: KernelParams>(&self, k: Kernel, grid: u32, block: u32, smem: u32, stream: &CudaStream, params: &P) -> Result<()> {
        let f = &self.inner.kernels.functions[&k];
        self.launch_function(k, (f.raw, f.max_threads), grid, block, smem, stream, params)
    }

    /// [`Group::launch`] of `k` as compiled into another module of this context (the NVSHMEM
    /// module's low-latency kernels): `f` and its thread limit.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_function<P: KernelParams>(
        &self,
        k: Kernel,
        (raw, max_threads): (sys::CUfunction, u32),
        grid: u32,
        block: u32,
        smem: u32,
        stream: &CudaStream,
        params: &P,
    ) -> Result<()> {
        // A failed group runs nothing more: its buffers' GPU state is undefined.
        self.ensure_healthy()?;
        if !P::ENTRIES.contains(&k.name()) {
            return Err(Error::Internal {
                reason: format!("{} was launched with a parameter block for {:?} ({} bytes)", k.name(), P::ENTRIES, std::mem::size_of::<P>()),
            });
        }
        let block = whole_warps(block, max_threads);
        self.inner.ctx.bind_to_thread().during("cuCtxSetCurrent", || format!("launching {}", k.name()))?;
        // SAFETY: `P` is the kernel's parameter block (its `KernelParams` impl names this kernel,
        // checked above; the PTX test compares its size with the PTX's declaration); every
        // address in it belongs to allocations the caller keeps alive until the stream has run
        // the kernel.
        unsafe { driver::launch(raw, grid.max(1), block, smem, stream, params) }
            .during("cuLaunchKernel", || format!("rank {} launching {} (grid {grid}, block {block}, {smem} B shared)", self.inner.rank, k.name()))?;
        self.inner.work.mark(stream)
    }
}

/// Threads per block a launch asking for `requested` gets from a kernel allowing `max`: the
/// request, clamped to the limit, in whole warps (at least one).
fn whole_warps(requested: u32, max: u32) -> u32 {
    (requested.min(max) / 32 * 32).max(32)
}

/// An operation's argument, by name, and the stream its memory is ordered on (if any).
pub(crate) type ArgStream<'a> = (&'static str, Option<&'a Arc<CudaStream>>);

/// A GPU as its rank's process numbers it, and its UUID (the same in every process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GpuId {
    ordinal: usize,
    uuid: [u8; 16],
}

impl GpuId {
    const BYTES: usize = 20;

    fn to_bytes(self) -> Vec<u8> {
        let mut b = (self.ordinal as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&self.uuid);
        b
    }
}

impl std::fmt::Display for GpuId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = &self.uuid;
        let hex = |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
        write!(f, "GPU {} (GPU-{}-{}-{}-{}-{})", self.ordinal, hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
    }
}

/// What a peer-access row says about one peer.
mod access {
    /// Peer-to-peer access works.
    pub const YES: u8 = 1;
    /// The driver says it does not.
    pub const NO: u8 = 0;
    /// The peer's GPU is not visible in this process, so it cannot be checked here.
    pub const NOT_VISIBLE: u8 = 2;
}

/// Every rank's GPU from the all-gathered blobs ([`GpuId::BYTES`] each); anything else is a
/// typed error naming the rank that sent it.
fn parse_gpus(blobs: &[Vec<u8>], rank: usize, world: usize) -> Result<Vec<GpuId>> {
    if blobs.len() != world {
        return Err(Error::Rendezvous { rank, world, reason: format!("device exchange returned {} entries for {world} ranks", blobs.len()) });
    }
    blobs
        .iter()
        .enumerate()
        .map(|(r, b)| match <[u8; GpuId::BYTES]>::try_from(b.as_slice()) {
            Ok(v) => {
                Ok(GpuId { ordinal: u32::from_le_bytes(v[..4].try_into().expect("4 bytes")) as usize, uuid: v[4..].try_into().expect("16 bytes") })
            }
            Err(_) => Err(Error::Rendezvous {
                rank,
                world,
                reason: format!("rank {r} sent a malformed device id ({} bytes, expected {})", b.len(), GpuId::BYTES),
            }),
        })
        .collect()
}

/// This rank's row of the peer-access exchange: one [`access`] byte per rank, then whether it
/// opted in to sharing its GPU, its SM count and the most its context may use
/// ([`SmShare::limit`]).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerRow {
    access: Vec<u8>,
    share_gpu: bool,
    sms: u32,
    limit: u32,
}

impl PeerRow {
    const TAIL: usize = 9;

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.access.clone();
        b.push(self.share_gpu as u8);
        b.extend_from_slice(&self.sms.to_le_bytes());
        b.extend_from_slice(&self.limit.to_le_bytes());
        b
    }

    fn parse(b: &[u8], world: usize) -> Option<PeerRow> {
        if b.len() != world + Self::TAIL {
            return None;
        }
        let word = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        Some(PeerRow { access: b[..world].to_vec(), share_gpu: b[world] == 1, sms: word(world + 1), limit: word(world + 5) })
    }
}

/// Checks the all-gathered peer rows ([`PeerRow`]): every row well formed, no pair known not to
/// reach each other, and ranks on one GPU (by UUID) only where that is allowed: processes
/// (never threads, which would share one CUDA context), every one of them opted in
/// ([`GroupConfig::share_gpu`]), and SM shares that fit on the GPU together (every block of
/// every rank must be resident at once). A pair one process cannot see is accepted here;
/// mapping the peer's heap then says whether it works.
fn check_peer_rows(rows: &[Vec<u8>], gpus: &[GpuId], rank: usize, mode: Mode) -> Result<()> {
    let world = gpus.len();
    if rows.len() != world {
        return Err(Error::Rendezvous { rank, world, reason: format!("peer-access exchange returned {} rows for {world} ranks", rows.len()) });
    }
    let rows: Vec<PeerRow> = rows
        .iter()
        .enumerate()
        .map(|(a, b)| {
            PeerRow::parse(b, world).ok_or_else(|| Error::Rendezvous {
                rank,
                world,
                reason: format!("rank {a} sent a peer-access row of {} bytes for {world} ranks (expected {})", b.len(), world + PeerRow::TAIL),
            })
        })
        .collect::<Result<_>>()?;
    for (a, ra) in rows.iter().enumerate() {
        for (b, &ok) in ra.access.iter().enumerate() {
            if ok == access::NO {
                return Err(Error::NoPeerAccess { rank_a: a, device_a: gpus[a].ordinal, rank_b: b, device_b: gpus[b].ordinal });
            }
        }
    }
    for a in 0..world {
        let on_gpu: Vec<usize> = (0..world).filter(|&b| gpus[b].uuid == gpus[a].uuid).collect();
        if on_gpu.len() < 2 || on_gpu[0] != a {
            continue;
        }
        let (first, second) = (on_gpu[0], on_gpu[1]);
        if mode == Mode::Threads {
            return Err(Error::invalid(
                "device",
                format!(
                    "ranks {first} and {second} are threads of one process on {}: they would share one CUDA context, whose \
                     synchronising calls wait for each other's spinning kernels; run one process per rank (GroupConfig::share_gpu, under CUDA MPS)",
                    gpus[first]
                ),
            ));
        }
        if let Some(&b) = on_gpu.iter().find(|&&b| !rows[b].share_gpu) {
            let other = if b == first { second } else { first };
            let (lo, hi) = (other.min(b), other.max(b));
            return Err(Error::invalid(
                "device",
                format!(
                    "ranks {lo} and {hi} both use {}; each rank needs its own GPU, unless every rank on it opts in to sharing it: \
                     GroupConfig::share_gpu or {SHARE_GPU_ENV}=1 (rank {b} did not), with the CUDA MPS control daemon running \
                     (nvidia-cuda-mps-control -d) so that the ranks' kernels run at once",
                    gpus[first]
                ),
            ));
        }
        // Under MPS every client may be limited to the same SMs, so every rank's blocks must
        // fit within the smallest limit among them.
        let sum: u64 = on_gpu.iter().map(|&b| rows[b].sms as u64).sum();
        let room = on_gpu.iter().map(|&b| rows[b].limit).min().unwrap_or(0);
        if sum > room as u64 {
            let shares: Vec<String> = on_gpu.iter().map(|&b| format!("rank {b}: {}", rows[b].sms)).collect();
            return Err(Error::invalid(
                "sm_budget",
                format!(
                    "the {} ranks on {} would use {sum} SMs together ({}) but their contexts may use {room}, and every block of \
                     every rank must be resident at once; give each at most {} ({SM_BUDGET_ENV}), or leave it unset for an equal split",
                    on_gpu.len(),
                    gpus[first],
                    shares.join(", "),
                    room as usize / on_gpu.len()
                ),
            ));
        }
    }
    Ok(())
}

/// What decides how many SMs a rank's kernels may use.
#[derive(Clone, Copy, Debug)]
struct SmShare {
    /// SMs the device reports to this rank's context (under CUDA MPS with an active-thread
    /// percentage, already the client's limit).
    total: u32,
    /// What `cuCtxGetExecAffinity` says the rank's context may use.
    context_limit: Option<u32>,
    /// `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, where set.
    mps_percent: Option<f64>,
    /// Ranks on this GPU.
    sharers: usize,
    /// [`GroupConfig::sm_budget`] (0: none).
    budget: u32,
}

impl SmShare {
    /// The rank's SMs, and where they come from: the budget when given (an error above what the
    /// context may use); alone on its GPU, what the context may use; sharing it, an equal split
    /// of that, less a little room for other kernels. Under CUDA MPS with an active-thread
    /// percentage the driver reports the client's limited SM count (12 of 132 at 10% on an
    /// H200, 580 driver), and clients with the same percentage may all be confined to the same
    /// SMs, so the split divides that limit among every rank on the GPU.
    fn resolve(self) -> Result<(u32, String)> {
        let limit = self.limit();
        let mps = self.percent().map(|p| format!(" (its CUDA MPS context's limit, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={p})")).unwrap_or_default();
        if self.budget > 0 {
            if self.budget > limit {
                return Err(Error::invalid("sm_budget", format!("{} SMs but this rank may use {limit}{mps}", self.budget)));
            }
            return Ok((self.budget, format!("its SM budget ({SM_BUDGET_ENV} or GroupConfig::sm_budget)")));
        }
        if self.sharers > 1 {
            let split = limit / self.sharers as u32;
            let reserve = (split / 4).min(2);
            let each = (split - reserve).max(1);
            let of = if mps.is_empty() { format!("the GPU's {limit} SMs") } else { format!("the {limit} SMs{mps}") };
            return Ok((each, format!("an equal split of {of} among the {} ranks on it, less {reserve} for other kernels", self.sharers)));
        }
        if !mps.is_empty() {
            return Ok((limit, format!("the {limit} SMs{mps}")));
        }
        Ok((limit, format!("every SM of the GPU ({limit})")))
    }

    /// What the context may use: the SM count the device reports to it, and its execution
    /// affinity where that says less.
    fn limit(self) -> u32 {
        let total = self.total.max(1);
        self.context_limit.filter(|&c| c > 0).map_or(total, |c| total.min(c))
    }

    /// A usable MPS percentage (the driver refuses others).
    fn percent(self) -> Option<f64> {
        self.mps_percent.filter(|p| *p > 0.0 && *p <= 100.0)
    }
}

fn open_device(device: usize) -> Result<Arc<CudaContext>> {
    if !driver::driver_present() {
        return Err(Error::NoDevice { reason: "libcuda.so could not be loaded (no NVIDIA driver on this machine)".into() });
    }
    let count = CudaContext::device_count().map_err(|e| Error::NoDevice { reason: format!("cuInit/cuDeviceGetCount failed: {e}") })? as usize;
    if device >= count {
        return Err(Error::NoDevice { reason: format!("GPU {device} requested but this machine has {count}") });
    }
    let ctx = CudaContext::new(device).during("cuDevicePrimaryCtxRetain", || format!("opening GPU {device}"))?;
    // SAFETY: every operation of this library is ordered by the stream it is given; buffers
    // allocated through this context are the caller's to order the same way.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// The CUDA MPS control daemon's pipe this process's CUDA clients would connect to
/// (`$CUDA_MPS_PIPE_DIRECTORY/control`, by default `/tmp/nvidia-mps/control`), where it exists.
pub fn mps_control_pipe() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("CUDA_MPS_PIPE_DIRECTORY").filter(|d| !d.is_empty()).unwrap_or_else(|| "/tmp/nvidia-mps".into());
    let pipe = std::path::Path::new(&dir).join("control");
    pipe.exists().then_some(pipe)
}

/// Number of CUDA devices, or why there are none (no driver, no GPU).
pub fn device_count() -> Result<usize> {
    if !driver::driver_present() {
        return Err(Error::NoDevice { reason: "libcuda.so could not be loaded (no NVIDIA driver on this machine)".into() });
    }
    CudaContext::device_count().map(|c| c as usize).map_err(|e| Error::NoDevice { reason: format!("cuInit/cuDeviceGetCount failed: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_numbered_by_their_first_rank() {
        let names: Vec<Vec<u8>> = ["b", "b", "a", "c", "a", "b"].iter().map(|n| n.as_bytes().to_vec()).collect();
        assert_eq!(node_numbers(&names), vec![0, 0, 1, 2, 1, 0]);
        assert_eq!(node_numbers(&[b"x".to_vec()]), vec![0]);
        // The process's own name: the override first, else something that names this machine.
        assert!(!node_name().is_empty());
    }

    #[test]
    fn every_kernel_is_named_by_its_parameter_block() {
        for &k in Kernel::ALL {
            assert!(k.params_entries().contains(&k.name()), "{} is not among its block's entries {:?}", k.name(), k.params_entries());
        }
        let names: std::collections::HashSet<_> = Kernel::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), Kernel::ALL.len(), "two kernels share an entry name");
    }

    #[test]
    fn malformed_device_ids_and_peer_rows_are_typed_errors() {
        let gpu = |ordinal: usize, u: u8| GpuId { ordinal, uuid: [u; 16] };
        let (a, b) = (gpu(0, 0xa0), gpu(3, 0xb0));
        assert_eq!(parse_gpus(&[a.to_bytes(), b.to_bytes()], 0, 2).unwrap(), vec![a, b]);
        let e = parse_gpus(&[a.to_bytes(), vec![1, 2, 3]], 0, 2).unwrap_err().to_string();
        assert!(e.contains("rank 1 sent a malformed device id (3 bytes, expected 20)"), "{e}");
        assert!(parse_gpus(&[a.to_bytes()], 0, 2).unwrap_err().to_string().contains("1 entries for 2 ranks"));
        let gpus = [a, b];
        let row = |access: Vec<u8>| PeerRow { access, share_gpu: false, sms: 132, limit: 132 }.to_bytes();
        let p = Mode::Processes;
        check_peer_rows(&[row(vec![1, 1]), row(vec![1, 1])], &gpus, 0, p).unwrap();
        let e = check_peer_rows(&[row(vec![1, 1]), vec![1, 1, 1, 1, 1]], &gpus, 0, p).unwrap_err().to_string();
        assert!(e.contains("rank 1 sent a peer-access row of 5 bytes for 2 ranks (expected 11)"), "{e}");
        assert!(matches!(check_peer_rows(&[row(vec![1, 0]), row(vec![1, 1])], &gpus, 0, p), Err(Error::NoPeerAccess { rank_a: 0, rank_b: 1, .. })));
        // A peer GPU this process cannot see is not an error here.
        check_peer_rows(&[row(vec![1, access::NOT_VISIBLE]), row(vec![access::NOT_VISIBLE, 1])], &gpus, 0, p).unwrap();
        // Same ordinal in two processes (one visible GPU each) is fine; the same UUID is not.
        check_peer_rows(&[row(vec![1, 1]), row(vec![1, 1])], &[gpu(0, 1), gpu(0, 2)], 0, p).unwrap();
        let e = check_peer_rows(&[row(vec![1, 1]), row(vec![1, 1])], &[gpu(0, 7), gpu(2, 7)], 0, p).unwrap_err().to_string();
        assert!(e.contains("ranks 0 and 1 both use GPU 0 (GPU-07070707-0707-0707-0707-070707070707)"), "{e}");
        assert!(e.contains("MOE_EP_SHARE_GPU=1 (rank 0 did not)") && e.contains("nvidia-cuda-mps-control -d"), "{e}");
    }

    #[test]
    fn sharing_a_gpu_needs_processes_every_rank_opted_in_and_shares_that_fit() {
        let g = GpuId { ordinal: 0, uuid: [9; 16] };
        let other = GpuId { ordinal: 1, uuid: [8; 16] };
        let row = |share_gpu: bool, sms: u32, limit: u32| PeerRow { access: vec![1; 3], share_gpu, sms, limit }.to_bytes();
        let (p, t) = (Mode::Processes, Mode::Threads);
        // Three processes on one GPU, all opted in, 42 SMs each: accepted.
        check_peer_rows(&[row(true, 42, 132), row(true, 42, 132), row(true, 42, 132)], &[g, g, g], 1, p).unwrap();
        // Two on one GPU, the third alone on another: only the two must opt in, and only their
        // shares must fit together.
        check_peer_rows(&[row(true, 64, 132), row(false, 132, 132), row(true, 64, 132)], &[g, other, g], 0, p).unwrap();
        // One of them did not opt in: named.
        let e = check_peer_rows(&[row(true, 4, 132), row(true, 4, 132), row(false, 4, 132)], &[g, g, g], 0, p).unwrap_err().to_string();
        assert!(e.contains("ranks 0 and 2 both use GPU 0") && e.contains("(rank 2 did not)"), "{e}");
        // Threads of one process never share a GPU, opted in or not.
        let e = check_peer_rows(&[row(true, 4, 132), row(true, 4, 132), row(true, 4, 132)], &[g, g, g], 0, t).unwrap_err().to_string();
        assert!(e.contains("ranks 0 and 1 are threads of one process") && e.contains("one process per rank"), "{e}");
        // Shares that cannot all be resident at once: under MPS at 48% each client may use 62
        // SMs, the same 62 for both (seen: two 62-block grids deadlocked).
        let e = check_peer_rows(&[row(true, 62, 62), row(false, 132, 132), row(true, 62, 62)], &[g, other, g], 0, p).unwrap_err().to_string();
        assert!(
            e.contains("invalid argument `sm_budget`")
                && e.contains("would use 124 SMs together (rank 0: 62, rank 2: 62) but their contexts may use 62"),
            "{e}"
        );
        assert!(e.contains("give each at most 31 (MOE_EP_SM_BUDGET)"), "{e}");
    }

    #[test]
    fn a_ranks_sms_come_from_its_context_its_budget_or_an_equal_split() {
        let base = SmShare { total: 132, context_limit: Some(132), mps_percent: None, sharers: 1, budget: 0 };
        let sms = |s: SmShare| s.resolve().unwrap().0;
        assert_eq!(base.resolve().unwrap(), (132, "every SM of the GPU (132)".to_string()));
        // Shared: an equal split, less a little room.
        let split = SmShare { sharers: 2, ..base };
        assert_eq!(
            split.resolve().unwrap(),
            (64, "an equal split of the GPU's 132 SMs among the 2 ranks on it, less 2 for other kernels".to_string())
        );
        assert_eq!([3, 4, 8].map(|n| sms(SmShare { sharers: n, ..base })), [42, 31, 14]);
        // Under MPS with a percentage the driver reports the limited count: the split divides
        // it, as every client may be confined to the same SMs.
        let mps = SmShare { total: 62, context_limit: Some(62), mps_percent: Some(48.0), sharers: 2, ..base };
        assert_eq!(sms(mps), 29);
        assert_eq!(sms(SmShare { total: 12, context_limit: Some(12), mps_percent: Some(10.0), sharers: 8, ..base }), 1);
        let alone = SmShare { sharers: 1, ..mps };
        assert_eq!(alone.resolve().unwrap(), (62, "the 62 SMs (its CUDA MPS context's limit, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=48)".to_string()));
        assert_eq!(sms(SmShare { context_limit: Some(16), ..base }), 16);
        // An explicit budget, within what the context may use.
        assert_eq!(sms(SmShare { budget: 20, sharers: 4, ..base }), 20);
        let e = SmShare { budget: 70, ..mps }.resolve().unwrap_err().to_string();
        assert!(e.contains("invalid argument `sm_budget`: 70 SMs but this rank may use 62 (its CUDA MPS context's limit"), "{e}");
        // Nonsense percentages are ignored (MPS refuses them itself).
        assert_eq!(sms(SmShare { mps_percent: Some(0.0), ..base }), 132);
    }

    #[test]
    fn the_environment_opts_in_to_sharing_and_sets_the_budget() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string());
        let c = GroupConfig::default().with_vars(vars(&[("MOE_EP_SHARE_GPU", "1"), ("MOE_EP_SM_BUDGET", "14")])).unwrap();
        assert!(c.share_gpu);
        assert_eq!(c.sm_budget, 14);
        let c = GroupConfig { share_gpu: true, ..GroupConfig::default() }.with_vars(vars(&[("MOE_EP_SHARE_GPU", "0")])).unwrap();
        assert!(!c.share_gpu);
        let c = GroupConfig { share_gpu: true, sm_budget: 3, ..GroupConfig::default() }.with_vars(vars(&[])).unwrap();
        assert!(c.share_gpu && c.sm_budget == 3, "no variable set keeps the configuration");
        let e = GroupConfig::default().with_vars(vars(&[("MOE_EP_SHARE_GPU", "maybe")])).unwrap_err().to_string();
        assert!(e.contains("`MOE_EP_SHARE_GPU`: \"maybe\" is not 1 or 0"), "{e}");
        let e = GroupConfig::default().with_vars(vars(&[("MOE_EP_SM_BUDGET", "-3")])).unwrap_err().to_string();
        assert!(e.contains("`MOE_EP_SM_BUDGET`: \"-3\" is not an SM count"), "{e}");
    }
}
