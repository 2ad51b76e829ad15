//! The ABI shared by the host crate and the PTX: limits, error records, control block and
//! the parameter blocks every kernel takes by value.
//!
//! Every type here is `#[repr(C)]`, has explicit-width fields and is `bytemuck::Pod`, so the
//! host fills it byte for byte as the device reads it. Device addresses are `u64` (never
//! references). The PTX check in `tests/` compares each kernel's `.param .b8 [N]` size with
//! `size_of` of its parameter block, so a field added on one side only fails a test.
//!
//! This file holds what every kernel shares (limits, error records, the control block); the
//! parameter blocks and heap layouts of each family live in `foundation`, `ht` and `ll`,
//! re-exported here.

use bytemuck::{Pod, Zeroable};

mod foundation;
mod ht;
mod ll;
mod nvshmem;

pub use foundation::*;
pub use ht::*;
pub use ll::*;
pub use nvshmem::*;

/// A kernel's by-value parameter block and the PTX entries that take it. The host launches an
/// entry only with a block that names it, and the PTX check compares every entry's declared
/// parameter size with `size_of` of its block.
pub trait KernelParams: Pod {
    /// PTX entry names of the kernels taking this block.
    const ENTRIES: &'static [&'static str];
}

/// Most ranks the high-throughput kernels take (one NVLink domain), and the size of the
/// per-rank arrays in [`Control`] and of [`Peers`], which they and the test kernels use. A group
/// may have more ([`GROUP_MAX_RANKS`]); the low-latency kernels' limit is [`LL_MAX_RANKS`], and
/// their per-rank tables, like every heap's [`HeapTables`], are sized by the rank count.
pub const MAX_RANKS: usize = 8;
/// Most ranks of a group: its barrier and every heap's [`HeapTables`] are sized by the rank
/// count, so the limit is the low-latency kernels' own.
pub const GROUP_MAX_RANKS: usize = LL_MAX_RANKS;
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
    /// The host raised this rank's abort flag ([`super::host_flag`]) while a kernel waited: `peer` is
    /// the rank that failed, `seen` the reason ([`super::abort_reason`]).
    pub const ABORTED: u32 = 5;
    /// An index read from a peer's data or from the receive buffers is out of range (`peer`:
    /// the rank whose data held it, `expected`: the limit, `seen`: the value, `waited_ns`: which
    /// index, a [`super::bad_index`] code). Nothing was read or written through it.
    pub const BAD_INDEX: u32 = 6;
}

/// Which index a [`status::BAD_INDEX`] record names.
pub mod bad_index {
    /// A source rank.
    pub const SOURCE: u64 = 1;
    /// A token of a source rank.
    pub const TOKEN: u64 = 2;
    /// A top-k slot.
    pub const SLOT: u64 = 3;
    /// A count of tokens or rows.
    pub const COUNT: u64 = 4;
    /// A received row.
    pub const ROW: u64 = 5;

    /// Human-readable name of an index code.
    pub const fn name(code: u64) -> &'static str {
        match code {
            SOURCE => "source rank",
            TOKEN => "token index",
            SLOT => "top-k slot",
            COUNT => "count",
            ROW => "received row",
            _ => "index",
        }
    }
}

/// Words of a rank's host-mapped flags (pinned host memory the device can read): the host's
/// watchdog raises `ABORT` when a peer fails, and every spin-wait polls it; `REPORTED` mirrors
/// the status of this rank's first device error, and `RECORD` that error's fields, for the
/// watchdog to pass on to the peers without a copy from the device.
pub mod host_flag {
    /// Host to device: 0, or the reason ([`super::abort_reason`]) every wait must stop for.
    pub const ABORT: usize = 0;
    /// Host to device: the rank that failed (written before `ABORT`).
    pub const CULPRIT: usize = 1;
    /// Device to host: the status code of this rank's first reported error, or 0.
    pub const REPORTED: usize = 2;
    /// Device to host: a copy of this rank's first reported [`super::ErrorRecord`], in its
    /// layout (16 words; a u64 field's offset stays 8-aligned): the reporting thread writes its
    /// fields from `phase` to `waited_ns` before it publishes `REPORTED` (`claim`, `status` and
    /// `host` stay 0; the host takes the status from `REPORTED`).
    pub const RECORD: usize = 4;
    /// Words in the allocation.
    pub const WORDS: usize = RECORD + 16;
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
    /// Low-latency combine send half (reading what the dispatch received).
    pub const LL_COMBINE_SEND: u32 = 11;

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
            LL_COMBINE_SEND => "low-latency combine send",
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
/// are arrays indexed by the writer's rank, of [`MAX_RANKS`] entries: only the high-throughput
/// and test kernels use them. What a group of any size needs (the barrier's slots) is in the
/// heap's [`HeapTables`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct Control {
    /// Barrier: this rank's epoch (local only).
    pub barrier_epoch: u32,
    /// High-throughput notify: this rank's call counter (local only).
    pub notify_seq: u32,
    /// Low-latency combine: blocks done per half (local, self-cleaning).
    pub ll_combine_done: [u32; 2],
    /// Low-latency combine: how many combines this rank has run on each half (local; the last
    /// block of a combine's receive half stores it).
    pub ll_combine_seq: [u32; 2],
    pub _pad0: [u32; 2],
    /// High-throughput notify: flag per (parity, source) holding the source's call counter.
    pub notify_flags: [[u32; MAX_RANKS]; 2],
    /// High-throughput dispatch: blocks of each source whose rows have landed.
    pub ht_dispatch_arrive: [u32; MAX_RANKS],
    /// Low-latency dispatch: how many dispatches this rank has run on each half (local; the
    /// last block of a dispatch's receive half bumps it).
    pub ll_dispatch_seq: [u32; 2],
    /// Low-latency dispatch: receive blocks done per half (local, self-cleaning).
    pub ll_dispatch_done: [u32; 2],
    /// Tests: arrival counters written by peers (cumulative, never reset).
    pub test_flags: [u32; MAX_RANKS],
    /// Flag ping-pong: slot `s` written by rank `s` (the host zeroes it before each run).
    pub ping_flags: [u32; MAX_RANKS],
}
const _: () = assert!(core::mem::size_of::<Control>().is_multiple_of(16));

/// Bytes reserved for [`Control`] at the start of every heap.
pub const CONTROL_BYTES: u64 = align_up(core::mem::size_of::<Control>() as u64, REGION_ALIGN);

/// The tables every symmetric heap ends with, after the `body` bytes its user asked for
/// (offsets from the heap's start, the same on every rank), sized by the group's rank count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HeapTables {
    /// `u64 [R]`, this rank's own (never read by peers): rank `r`'s heap base as this process
    /// maps it, with [`RANK_PUT`] set for a rank reached through NVSHMEM calls (whose base is
    /// then this rank's own: the kernels' address arithmetic yields the symmetric address).
    /// Written once when the heap is made, before any launch.
    pub ranks: u64,
    /// `u32 [R]`: the barrier's slots; slot `s` holds the epoch rank `s` last reached.
    pub barrier: u64,
    /// Heap bytes in all.
    pub end: u64,
}

/// [`HeapTables::ranks`] entry bit: the rank is reached through NVSHMEM calls.
pub const RANK_PUT: u64 = 1;

impl HeapTables {
    /// The tables of a heap whose user asked for `body` bytes, for `world` ranks.
    pub const fn new(body: u64, world: u64) -> Self {
        let a = REGION_ALIGN;
        let ranks = align_up(body, a);
        let barrier = align_up(ranks + world * 8, a);
        let end = align_up(barrier + world * 4, a);
        HeapTables { ranks, barrier, end }
    }
}

/// Rounds `x` up to a multiple of `a` (a power of two).
pub const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}
