//! The symmetric heap: one device buffer of the same size and layout on every rank, mapped
//! into every rank's address space, so a kernel reaches rank `r`'s copy at
//! `peers.base[r] + offset` (like `nvshmem_ptr`).
//!
//! Multi-process groups share it with CUDA IPC (`cuIpcGetMemHandle` on the owner, handles
//! all-gathered through the rendezvous, `cuIpcOpenMemHandle` on the peers); single-process
//! groups use plain pointers with peer access enabled. Drop order is fixed by ownership: the
//! heap synchronises its context, meets every rank at a host barrier (so no peer still uses
//! this rank's memory), closes the peers' mappings, meets every rank again (so nobody still
//! maps this rank's memory), then frees its own allocation.

use crate::driver::{DeviceAlloc, IpcMapping, ipc};
use crate::error::{DriverContext, Error, Result};
use crate::rendezvous::Exchange;
use cudarc::driver::CudaContext;
use moe_ep_kernels::abi::{MAX_RANKS, Peers};
use std::sync::Arc;
use std::time::Duration;

/// How long a dropping heap waits for the other ranks before closing anyway.
const DROP_BARRIER_TIMEOUT: Duration = Duration::from_secs(30);

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
    local: DeviceAlloc,
    peers: Peers,
    /// Peer allocations mapped over IPC (closed in drop, between its two barriers).
    opened: Vec<IpcMapping>,
    exchange: Arc<dyn Exchange>,
    ctx: Arc<CudaContext>,
}

impl SymmetricHeap {
    /// Collective: every rank of the group calls it with the same `bytes`. The heap starts
    /// zeroed on every rank before any rank can touch a peer's copy.
    pub(crate) fn new(ctx: &Arc<CudaContext>, exchange: &Arc<dyn Exchange>, mode: Mode, bytes: u64, timeout: Duration) -> Result<Self> {
        let (rank, world) = (exchange.rank(), exchange.world());
        if world > MAX_RANKS {
            return Err(Error::invalid("world", format!("{world} ranks exceed the {MAX_RANKS} a heap maps")));
        }
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
        let local = DeviceAlloc::zeroed(ctx, bytes as usize)?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut heap = SymmetricHeap { id, peers: Peers::default(), opened: Vec::new(), local, exchange: exchange.clone(), ctx: ctx.clone() };
        match mode {
            Mode::Threads => {
                let ptrs = exchange.all_gather_as("heap pointers", &heap.local.ptr().to_le_bytes(), timeout)?;
                for (r, p) in ptrs.iter().enumerate() {
                    heap.peers.base[r] = u64::from_le_bytes(p.as_slice().try_into().map_err(|_| Error::Rendezvous {
                        rank,
                        world,
                        reason: format!("rank {r} sent a malformed heap pointer"),
                    })?);
                }
            }
            Mode::Processes => {
                let h = ipc::get_mem_handle(heap.local.ptr()).during("cuIpcGetMemHandle", || format!("exporting rank {rank}'s heap"))?;
                let handles = exchange.all_gather_as("heap IPC handles", &h, timeout)?;
                for (r, hb) in handles.iter().enumerate() {
                    if r == rank {
                        heap.peers.base[r] = heap.local.ptr();
                        continue;
                    }
                    let h: [u8; 64] = hb.as_slice().try_into().map_err(|_| Error::Rendezvous {
                        rank,
                        world,
                        reason: format!("rank {r} sent a malformed IPC handle"),
                    })?;
                    let m = IpcMapping::open(ctx, &h).during("cuIpcOpenMemHandle", || format!("rank {rank} opening rank {r}'s heap"))?;
                    heap.peers.base[r] = m.ptr();
                    heap.opened.push(m);
                }
            }
        }
        exchange.barrier(timeout)?;
        Ok(heap)
    }

    /// This heap's identity, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Heap base of every rank, as mapped in this process.
    pub fn peers(&self) -> Peers {
        self.peers
    }

    /// Device address of this rank's heap.
    pub fn local_ptr(&self) -> u64 {
        self.local.ptr()
    }

    /// Bytes per rank.
    pub fn bytes(&self) -> usize {
        self.local.bytes()
    }
}

impl Drop for SymmetricHeap {
    fn drop(&mut self) {
        // Nothing of this rank may still run on the heap, and no peer may still read or write
        // it: synchronise, then meet every rank. Failures are ignored (Drop never panics).
        let _ = self.ctx.synchronize();
        let _ = self.exchange.barrier(DROP_BARRIER_TIMEOUT);
        // No rank uses its peers' memory any more: close this rank's mappings of it.
        self.opened.clear();
        // Every rank has closed its mapping of this rank's allocation before it is freed
        // (field drop of `local`, right after this).
        let _ = self.exchange.barrier(DROP_BARRIER_TIMEOUT);
    }
}
