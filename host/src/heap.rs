//! The symmetric heap: one device buffer of the same size and layout on every rank, mapped
//! into every rank's address space, so a kernel reaches rank `r`'s copy at
//! `base[r] + offset` (like `nvshmem_ptr`). Every heap ends with its [`HeapTables`]: the rank
//! table the kernels read those bases from (written here, before any launch) and the slots of
//! the barrier over it, both sized by the group's rank count.
//!
//! Multi-process groups share it with CUDA IPC (`cuIpcGetMemHandle` on the owner, handles
//! all-gathered through the rendezvous, `cuIpcOpenMemHandle` on the peers); single-process
//! groups use plain pointers with peer access enabled.
//!
//! Releasing it takes every rank: peers may write into this rank's memory until they are done
//! with it. [`SymmetricHeap::destroy`] is the collective way (wait for this rank's kernels, meet
//! every rank, close the peers' mappings, meet again, free). A heap that is simply dropped runs
//! no collective (a drop may run on one rank only, from a garbage collector): it closes its
//! mappings of the peers if none of this rank's kernels still runs, and puts its own memory in
//! the group's [`Quarantine`]. Quarantined memory is freed at the group's next collective heap
//! creation once every rank has dropped that heap and closed its mappings; what is still there
//! when the group goes is kept until the process ends (never freed under a peer).
//!
//! A heap may also live in memory another library allocated symmetrically and maps itself
//! (NVSHMEM's `nvshmem_malloc`, feature `nvshmem`): [`ExternalHeap`]. Its peers' bases come from
//! that library, `destroy` frees it with the library's collective call after the same meeting,
//! and a drop frees nothing (the library releases its heap when it is finalised).

use crate::driver::{DeviceAlloc, IpcMapping, ipc};
use crate::error::{DriverContext, Error, Result};
use crate::rendezvous::Exchange;
use crate::work::OwnWork;
use cudarc::driver::CudaContext;
use moe_ep_kernels::abi::{HeapTables, MAX_RANKS, Peers, RANK_PUT};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A group's heaps that were dropped without [`SymmetricHeap::destroy`]: their memory waits
/// here until every rank has let go of them ([`Quarantine::reclaim`]).
pub(crate) struct Quarantine {
    /// Heaps this group created (a heap's number is the same on every rank, since heaps are
    /// created collectively in the same order).
    created: AtomicU64,
    dropped: Mutex<Vec<Dropped>>,
}

/// One dropped heap: its own memory, and its mappings of the peers' while this rank's kernels
/// might still use them.
struct Dropped {
    seq: u64,
    local: DeviceAlloc,
    opened: Vec<IpcMapping>,
}

impl Quarantine {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Quarantine { created: AtomicU64::new(0), dropped: Mutex::new(Vec::new()) })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Dropped>> {
        self.dropped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of this rank's memory held here.
    pub(crate) fn bytes(&self) -> usize {
        self.entries().iter().map(|d| d.local.bytes()).sum()
    }

    /// Collective (every rank, at the same point: the group's heap creation): closes this
    /// rank's remaining mappings of dropped heaps if none of its kernels still runs, tells every
    /// rank which dropped heaps it no longer maps, and frees this rank's memory of every heap
    /// that all ranks dropped and no longer map. Returns the bytes freed.
    pub(crate) fn reclaim(&self, exchange: &Arc<dyn Exchange>, work: &OwnWork, timeout: Duration) -> Result<usize> {
        let released: Vec<u64> = {
            let mut d = self.entries();
            if work.is_idle() {
                for e in d.iter_mut() {
                    e.opened.clear();
                }
            }
            d.iter().filter(|e| e.opened.is_empty()).map(|e| e.seq).collect()
        };
        let bytes: Vec<u8> = released.iter().flat_map(|s| s.to_le_bytes()).collect();
        let all = exchange.all_gather_as("released heaps", &bytes, timeout)?;
        let everywhere = |seq: u64| all.iter().all(|b| b.chunks_exact(8).any(|c| c == seq.to_le_bytes()));
        let mut d = self.entries();
        let before = d.iter().map(|e| e.local.bytes()).sum::<usize>();
        // Every rank has dropped these heaps and closed its mappings of them: nothing can reach
        // this rank's memory of them any more.
        d.retain(|e| !(e.opened.is_empty() && everywhere(e.seq)));
        Ok(before - d.iter().map(|e| e.local.bytes()).sum::<usize>())
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        // The group is gone on this rank, not necessarily on its peers, which may still write
        // into this memory: keep it (and the mappings, which a kernel may still use) until the
        // process ends.
        for e in std::mem::take(&mut *self.entries()) {
            std::mem::forget(e.local);
            std::mem::forget(e.opened);
        }
    }
}

/// How ranks share memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One process per GPU, CUDA IPC.
    Processes,
    /// One thread per GPU in one process, peer access.
    Threads,
}

/// One rank's view of a symmetric heap.
pub struct SymmetricHeap {
    /// Unique per heap in this process (buffers tie their handles to it).
    id: u64,
    /// Which of its group's heaps this is (the same on every rank).
    seq: u64,
    /// This rank's memory (taken by `destroy` or by the drop).
    local: Option<DeviceAlloc>,
    ptr: u64,
    bytes: usize,
    /// Where the rank table and barrier slots lie.
    tables: HeapTables,
    /// Every rank's heap base as mapped here (this rank's own for a put rank).
    bases: Vec<u64>,
    /// Ranks reached through NVSHMEM calls instead of `bases` (never on moe-ep's own heap).
    put: Vec<usize>,
    /// Ranks on other nodes, not mapped (their `bases` entry is this rank's own): no kernel
    /// may be launched on the heap (only the group's own heap has them).
    far: Vec<usize>,
    /// Peer allocations mapped over IPC.
    opened: Vec<IpcMapping>,
    /// Memory owned by another library instead of `local` (see [`ExternalHeap`]).
    external: Option<Box<dyn ExternalHeap>>,
    exchange: Arc<dyn Exchange>,
    quarantine: Arc<Quarantine>,
    work: Arc<OwnWork>,
}

/// Heap identities, unique in the process.
static NEXT_HEAP_ID: AtomicU64 = AtomicU64::new(1);

/// Symmetric memory that another library allocated and maps (NVSHMEM's): released by that
/// library's collective free, which [`SymmetricHeap::destroy`] calls once no rank uses the heap.
/// Dropping it without `free` must free nothing (a peer may still write into it).
pub(crate) trait ExternalHeap: Send + Sync {
    /// Collective: every rank calls it at the same point of `destroy`.
    fn free(self: Box<Self>) -> Result<()>;
    /// Kernel `k` as compiled into the module the library bound (the NVSHMEM module, whose
    /// kernels reach the heap's put ranks), with its thread limit.
    fn kernel(&self, k: crate::group::Kernel) -> Result<(cudarc::driver::sys::CUfunction, u32)>;
}

impl SymmetricHeap {
    /// Bytes a heap whose user asked for `body` takes per rank, its [`HeapTables`] included.
    pub(crate) fn total_bytes(body: u64, world: usize) -> u64 {
        HeapTables::new(body, world as u64).end
    }

    /// Collective: every rank of the group calls it with the same `bytes` (the user's: the
    /// heap adds its [`HeapTables`] after them). The heap starts zeroed on every rank before any
    /// rank can touch a peer's copy. Only the ranks `near` marks (this rank's node) are mapped.
    pub(crate) fn new(
        ctx: &Arc<CudaContext>,
        exchange: &Arc<dyn Exchange>,
        quarantine: &Arc<Quarantine>,
        work: &Arc<OwnWork>,
        (mode, near): (Mode, &[bool]),
        bytes: u64,
        timeout: Duration,
    ) -> Result<Self> {
        let (rank, world) = (exchange.rank(), exchange.world());
        quarantine.reclaim(exchange, work, timeout)?;
        let sizes = exchange.all_gather_as("heap sizes", &bytes.to_le_bytes(), timeout)?;
        for (r, s) in sizes.iter().enumerate() {
            let b = u64::from_le_bytes(s.as_slice().try_into().map_err(|_| Error::Rendezvous {
                rank,
                world,
                reason: format!("rank {r} sent a malformed heap size"),
            })?);
            if b != bytes {
                return Err(Error::invalid(
                    "heap bytes",
                    format!("rank {rank} asked for {bytes} bytes but rank {r} for {b}; every rank must build its buffer with the same configuration"),
                ));
            }
        }
        let tables = HeapTables::new(bytes, world as u64);
        let local = DeviceAlloc::zeroed(ctx, tables.end as usize)?;
        let id = NEXT_HEAP_ID.fetch_add(1, Ordering::Relaxed);
        let seq = quarantine.created.fetch_add(1, Ordering::Relaxed);
        let mut heap = SymmetricHeap {
            id,
            seq,
            ptr: local.ptr(),
            bytes: local.bytes(),
            local: Some(local),
            tables,
            bases: vec![0; world],
            put: Vec::new(),
            far: Vec::new(),
            opened: Vec::new(),
            external: None,
            exchange: exchange.clone(),
            quarantine: quarantine.clone(),
            work: work.clone(),
        };
        // A rank that fails to map a peer still takes part in every exchange below (one that
        // cannot export its heap sends an empty handle, which every peer fails on), so that all
        // ranks meet at the rank tables' agreement and none waits for it.
        let mapped = match mode {
            Mode::Threads => {
                let ptrs = exchange.all_gather_as("heap pointers", &heap.ptr.to_le_bytes(), timeout)?;
                ptrs.iter().enumerate().try_for_each(|(r, p)| {
                    heap.bases[r] = u64::from_le_bytes(p.as_slice().try_into().map_err(|_| Error::Rendezvous {
                        rank,
                        world,
                        reason: format!("rank {r} sent a malformed heap pointer"),
                    })?);
                    Ok(())
                })
            }
            Mode::Processes => {
                let h = ipc::get_mem_handle(heap.ptr).during("cuIpcGetMemHandle", || format!("exporting rank {rank}'s heap"));
                let handles = exchange.all_gather_as("heap IPC handles", h.as_ref().map_or(&[][..], |h| &h[..]), timeout)?;
                h.and_then(|_| heap.open_near(ctx, &handles, near))
            }
        };
        heap.write_rank_table(ctx, mapped, timeout)?;
        Ok(heap)
    }

    /// Maps every rank of this rank's node (`near`) from its all-gathered IPC handle; every
    /// other rank's base is this rank's own (listed in `far`).
    fn open_near(&mut self, ctx: &Arc<CudaContext>, handles: &[Vec<u8>], near: &[bool]) -> Result<()> {
        let (rank, world) = (self.exchange.rank(), self.exchange.world());
        for (r, hb) in handles.iter().enumerate() {
            if r == rank || !near.get(r).copied().unwrap_or(true) {
                self.bases[r] = self.ptr;
                if r != rank {
                    self.far.push(r);
                }
                continue;
            }
            let h: [u8; 64] = hb.as_slice().try_into().map_err(|_| Error::Rendezvous {
                rank,
                world,
                reason: format!("rank {r} sent a malformed IPC handle ({} bytes: it could not export its heap)", hb.len()),
            })?;
            let m = IpcMapping::open(ctx, &h).during("cuIpcOpenMemHandle", || format!("rank {rank} opening rank {r}'s heap"))?;
            self.bases[r] = m.ptr();
            self.opened.push(m);
        }
        Ok(())
    }

    /// Collective, the last step of making a heap: writes this rank's rank table
    /// ([`HeapTables::ranks`]) once the peers are `mapped`, then every rank learns whether every
    /// rank could (so a rank that could not is an error everywhere now, not a peer's timeout in
    /// the first launch or its wait in the next exchange). This rank's own error stays its own.
    fn write_rank_table(&self, ctx: &Arc<CudaContext>, mapped: Result<()>, timeout: Duration) -> Result<()> {
        let table: Vec<u64> = self.bases.iter().enumerate().map(|(r, &b)| b | if self.put.contains(&r) { RANK_PUT } else { 0 }).collect();
        let written = mapped.and_then(|_| ctx.new_stream().during("cuStreamCreate", || "writing a heap's rank table".into())).and_then(|s| {
            // SAFETY: the table region holds `world` u64 of this rank's heap (`HeapTables`); no
            // kernel uses the heap yet, and the copy completes before it returns.
            unsafe { crate::driver::copy_to_device(&table, self.ptr + self.tables.ranks, &s) }
                .during("cuMemcpyHtoDAsync", || "writing a heap's rank table".into())
        });
        let all = self.exchange.all_gather_as("heap rank tables", &[written.is_ok() as u8], timeout)?;
        written?;
        match all.iter().position(|b| b.first() != Some(&1)) {
            None => Ok(()),
            Some(r) => Err(Error::Rendezvous {
                rank: self.exchange.rank(),
                world: self.exchange.world(),
                reason: format!("rank {r} could not map its peers or write its rank table of a new heap (see its error)"),
            }),
        }
    }

    /// Collective: a heap in memory that `external` allocated symmetrically (`(ptr, body)` on
    /// this rank: [`SymmetricHeap::total_bytes`] of `body`, zeroed on every rank before the
    /// call), rank `r`'s copy at `bases[r]`, the ranks of `put` reached through NVSHMEM calls.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn adopt(
        ctx: &Arc<CudaContext>,
        exchange: &Arc<dyn Exchange>,
        quarantine: &Arc<Quarantine>,
        work: &Arc<OwnWork>,
        external: Box<dyn ExternalHeap>,
        (ptr, body): (u64, u64),
        (bases, put): (Vec<u64>, Vec<usize>),
        timeout: Duration,
    ) -> Result<Self> {
        if bases.len() != exchange.world() {
            return Err(Error::Internal { reason: format!("an adopted heap with {} bases for {} ranks", bases.len(), exchange.world()) });
        }
        let tables = HeapTables::new(body, bases.len() as u64);
        let id = NEXT_HEAP_ID.fetch_add(1, Ordering::Relaxed);
        let seq = quarantine.created.fetch_add(1, Ordering::Relaxed);
        let heap = SymmetricHeap {
            id,
            seq,
            local: None,
            ptr,
            bytes: tables.end as usize,
            tables,
            bases,
            put,
            far: Vec::new(),
            opened: Vec::new(),
            external: Some(external),
            exchange: exchange.clone(),
            quarantine: quarantine.clone(),
            work: work.clone(),
        };
        heap.write_rank_table(ctx, Ok(()), timeout)?;
        Ok(heap)
    }

    /// This heap's identity, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Heap base of every rank, as mapped in this process, as the kernels of at most
    /// [`MAX_RANKS`] ranks take it (by value: the high-throughput and test kernels); more ranks
    /// are an [`Error::InvalidArgument`] naming `what` needs them.
    pub fn peers(&self, what: &str) -> Result<Peers> {
        if !self.far.is_empty() {
            return Err(Error::invalid("group", format!("ranks {:?} are on other nodes, and {what} reaches ranks by direct stores", self.far)));
        }
        if self.bases.len() > MAX_RANKS {
            return Err(Error::invalid("world", format!("{} ranks: {what} takes at most {MAX_RANKS}", self.bases.len())));
        }
        let mut p = Peers::default();
        p.base[..self.bases.len()].copy_from_slice(&self.bases);
        Ok(p)
    }

    /// Heap base of rank `r` as mapped in this process.
    pub fn base(&self, r: usize) -> u64 {
        self.bases[r]
    }

    /// Ranks the kernels reach through NVSHMEM calls (see the field), in rank order.
    pub fn put_ranks(&self) -> &[usize] {
        &self.put
    }

    /// Ranks on other nodes, which this heap does not map (see the field).
    pub fn far_ranks(&self) -> &[usize] {
        &self.far
    }

    /// Device address of this rank's rank table ([`HeapTables::ranks`]).
    pub fn rank_table(&self) -> u64 {
        self.ptr + self.tables.ranks
    }

    /// Heap offset of the barrier's slots ([`HeapTables::barrier`]).
    pub fn barrier_slots(&self) -> u64 {
        self.tables.barrier
    }

    /// Kernel `k` of the module that reaches this heap's put ranks (see [`ExternalHeap::kernel`]).
    pub(crate) fn kernel(&self, k: crate::group::Kernel) -> Result<(cudarc::driver::sys::CUfunction, u32)> {
        match &self.external {
            Some(e) => e.kernel(k),
            None => Err(Error::Internal { reason: format!("{} was asked for on moe-ep's own heap, which has no put ranks", k.name()) }),
        }
    }

    /// Device address of this rank's heap.
    pub fn local_ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes per rank (its [`HeapTables`] included).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Collective: releases the heap on every rank. Waits (deadline: `work_timeout`) for this
    /// rank's kernels, checks that every rank destroys the same heap, closes this rank's
    /// mappings of the peers' memory, meets every rank (so no rank maps this rank's memory any
    /// more), then frees this rank's memory. On any error the heap is dropped instead (its
    /// memory quarantined, never freed under a peer) and the error returned.
    pub(crate) fn destroy(mut self, work_timeout: Duration, timeout: Duration) -> Result<()> {
        let (rank, world) = (self.exchange.rank(), self.exchange.world());
        // Every rank takes part in the exchange, so that one rank's failed wait is an error
        // everywhere, not a peer's hang.
        let waited = self.work.wait(rank, "destroy (waiting for its kernels)", work_timeout);
        let mut mine = self.seq.to_le_bytes().to_vec();
        mine.push(waited.is_ok() as u8);
        let all = self.exchange.all_gather_as("heap destroy", &mine, timeout)?;
        waited?;
        for (r, b) in all.iter().enumerate() {
            if b.len() != 9 || b[..8] != mine[..8] {
                let other = <[u8; 8]>::try_from(&b[..b.len().min(8)])
                    .map(u64::from_le_bytes)
                    .map_or("a malformed heap number".into(), |s| format!("heap #{s}"));
                return Err(Error::CollectiveMismatch {
                    what: "the buffer destroyed",
                    rank,
                    value: format!("heap #{}", self.seq),
                    other_rank: r,
                    other_value: other,
                });
            }
            if b[8] == 0 {
                return Err(Error::Rendezvous {
                    rank,
                    world,
                    reason: format!(
                        "destroying a buffer: rank {r}'s kernels did not finish in time, so its memory is kept (quarantined) on every rank"
                    ),
                });
            }
        }
        // None of this rank's kernels runs: its mappings of the peers can go.
        self.opened.clear();
        self.exchange.barrier(timeout).map_err(|e| Error::Rendezvous { rank, world, reason: format!("destroying a buffer: {e}") })?;
        // No rank maps this rank's memory any more.
        self.local = None;
        match self.external.take() {
            Some(e) => e.free(),
            None => Ok(()),
        }
    }
}

impl Drop for SymmetricHeap {
    fn drop(&mut self) {
        // No collective here (see the module's doc). Nothing of this rank still running means
        // nothing of it uses the peers' memory: close those mappings now; otherwise the
        // quarantine closes them later.
        if self.work.is_idle() {
            self.opened.clear();
        }
        if let Some(local) = self.local.take() {
            let opened = std::mem::take(&mut self.opened);
            self.quarantine.entries().push(Dropped { seq: self.seq, local, opened });
        }
    }
}
