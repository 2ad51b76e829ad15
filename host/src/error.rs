//! The library's one error type.

use cudarc::driver::DriverError;
use moe_ep_kernels::abi::{ErrorRecord, phase, status};
use std::time::Duration;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// NVSHMEM (feature `nvshmem`) is missing, of another version than the kernels' device
    /// bitcode, or refused a call.
    #[error("NVSHMEM: {reason}")]
    Nvshmem {
        /// What failed, with the library's status where it gave one.
        reason: String,
    },
    /// No usable CUDA driver or GPU on this machine.
    #[error("no GPU available: {reason}")]
    NoDevice {
        /// Why (no driver library, no device, or fewer devices than asked for).
        reason: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA driver call {op} failed while {during}: {source}")]
    Driver {
        /// The driver function (`cuMemAlloc`, ...).
        op: &'static str,
        /// What the library was doing.
        during: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },

    /// An argument is out of range or inconsistent; nothing was launched.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument (or field) at fault.
        name: &'static str,
        /// What is wrong with it, with the values.
        reason: String,
    },

    /// Two ranks' GPUs cannot reach each other over P2P.
    #[error(
        "rank {rank_a} (GPU {device_a}) cannot access rank {rank_b} (GPU {device_b}) over peer-to-peer; every pair of GPUs in a group must be NVLink (or PCIe P2P) peers"
    )]
    NoPeerAccess {
        /// The rank that cannot reach the other.
        rank_a: usize,
        /// Its CUDA device ordinal.
        device_a: usize,
        /// The rank it cannot reach.
        rank_b: usize,
        /// That rank's device ordinal.
        device_b: usize,
    },

    /// The rendezvous (handle exchange between ranks) failed.
    #[error("rendezvous (rank {rank} of {world}): {reason}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// The group's size.
        world: usize,
        /// What failed (the ranks that did not show up, the connections refused, ...).
        reason: String,
    },

    /// A kernel's spin-wait passed its deadline.
    #[error(
        "rank {rank} timed out in {phase} after {waited:?} waiting for rank {peer} (expected {expected}, saw {seen}); the group's GPU state is undefined, drop it"
    )]
    Timeout {
        /// The rank whose kernel waited.
        rank: usize,
        /// What it was doing (dispatch, combine, barrier, ...).
        phase: &'static str,
        /// The rank it waited for.
        peer: usize,
        /// The value it waited for.
        expected: u64,
        /// The value it saw last.
        seen: u64,
        /// How long it waited.
        waited: Duration,
    },

    /// The host waited for this rank's own kernels (a check, a buffer's `destroy`) past its
    /// deadline: something queued ahead of them on their streams kept them from finishing.
    #[error("rank {rank}: {what} gave up after {waited:?}: {reason}")]
    HostWaitTimeout {
        /// This rank.
        rank: usize,
        /// What was waited for.
        what: String,
        /// How long it waited.
        waited: Duration,
        /// What was still pending.
        reason: String,
    },

    /// A rank would receive more rows than its receive buffer holds.
    #[error(
        "rank {receiver} would receive {needed} rows but its receive buffer holds {capacity} (reported by rank {rank}); raise the buffer's receive capacity"
    )]
    CapacityExceeded {
        /// The rank that found out.
        rank: usize,
        /// The rank whose buffer is too small.
        receiver: usize,
        /// Rows it would receive.
        needed: u64,
        /// Rows its buffer holds.
        capacity: u64,
    },

    /// A routing entry is outside `[-1, num_experts)`.
    #[error("rank {rank}: topk_idx of token {token} holds {value}, outside [-1, {num_experts})")]
    InvalidExpert {
        /// The rank whose routing it is.
        rank: usize,
        /// The token.
        token: usize,
        /// The bad entry.
        value: i64,
        /// Experts in the model.
        num_experts: u64,
    },

    /// A kernel read an index (a source rank, a token, a slot, a count) out of range from a
    /// peer's data or from its receive buffers, and neither read nor wrote through it: those
    /// contents are corrupt (a peer's bug, or memory overwritten under the buffer). The group
    /// is failed.
    #[error("rank {rank}: {phase} read {what} {value} from rank {source_rank}'s data, outside 0..{limit}; the buffer's contents are corrupt")]
    BadIndex {
        /// The rank whose kernel found it.
        rank: usize,
        /// What the kernel was doing.
        phase: &'static str,
        /// Which index.
        what: &'static str,
        /// The value read.
        value: u64,
        /// Its exclusive limit.
        limit: u64,
        /// The rank whose data held it.
        source_rank: usize,
    },

    /// A handle (or layout) from an older dispatch, or whose routing was recomputed since: its
    /// rows were overwritten or no longer match.
    #[error("stale handle: {reason}")]
    StaleHandle {
        /// What is stale and why.
        reason: String,
    },

    /// A handle, layout or pending combine used with a buffer other than the one that made it.
    #[error("foreign handle: {reason}")]
    ForeignHandle {
        /// Which object and which buffer.
        reason: String,
    },

    /// A hook-mode call's receive half has not run yet (or has already run).
    #[error("pending hook: {reason}")]
    PendingHook {
        /// Which receive half.
        reason: String,
    },

    /// The library reached a state it should never reach (a bug; please report it).
    #[error("internal error: {reason}")]
    Internal {
        /// What happened.
        reason: String,
    },

    /// Ranks passed different values to a collective call that needs the same on every rank
    /// (a buffer's configuration, its launch sizes).
    #[error("{what} differs across ranks: rank {rank} has {value}, rank {other_rank} has {other_value}; every rank must pass the same")]
    CollectiveMismatch {
        /// The collective call or value.
        what: &'static str,
        /// This rank.
        rank: usize,
        /// This rank's value.
        value: String,
        /// A rank that passed something else.
        other_rank: usize,
        /// What it passed.
        other_value: String,
    },

    /// A GPU wait of this rank stopped because a peer failed: its process ended, it reported an
    /// error, it dropped its group or it called [`Group::abort`](crate::Group::abort) (then
    /// `peer` may be this rank). Learned within milliseconds, not at the wait deadline. The
    /// group is failed from then on.
    #[error("rank {rank} stopped waiting in {phase}: {cause}; the group is failed, drop it and build a new one")]
    PeerFailed {
        /// The rank whose wait stopped.
        rank: usize,
        /// What it was doing.
        phase: &'static str,
        /// The rank that failed.
        peer: usize,
        /// What happened to it.
        cause: String,
    },

    /// An earlier device error or timeout (`cause`) left this group's GPU state undefined
    /// (arrival counters, flags and rows of its buffers may be stale). Every later operation on
    /// the group and its buffers returns this instead of running: drop the buffers and the group
    /// and build new ones.
    #[error("the group failed earlier ({cause}); drop its buffers and the group and build new ones")]
    GroupFailed {
        /// The error that failed the group.
        cause: String,
    },

    /// The device reported an error code this library does not know (a bug).
    #[error("rank {rank}: unknown device error record {record:?}")]
    Device {
        /// The rank whose kernel reported it.
        rank: usize,
        /// The raw record.
        record: ErrorRecord,
    },
}

impl Error {
    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { name, reason: reason.into() }
    }

    /// Turns a device error record into an error (`None` when the record is clean).
    pub(crate) fn from_record(rec: &ErrorRecord) -> Option<Self> {
        let rank = rec.rank as usize;
        match rec.status {
            status::OK => None,
            status::TIMEOUT => Some(Error::Timeout {
                rank,
                phase: phase::name(rec.phase),
                peer: rec.peer as usize,
                expected: rec.expected,
                seen: rec.seen,
                waited: Duration::from_nanos(rec.waited_ns),
            }),
            status::ABORTED => Some(Error::PeerFailed {
                rank,
                phase: phase::name(rec.phase),
                peer: rec.peer as usize,
                cause: crate::watchdog::reason_text(rec.peer as usize, rec.seen),
            }),
            status::CAPACITY => Some(Error::CapacityExceeded { rank, receiver: rec.peer as usize, needed: rec.seen, capacity: rec.expected }),
            status::BAD_EXPERT => Some(Error::InvalidExpert { rank, token: rec.peer as usize, value: rec.seen as i64, num_experts: rec.expected }),
            status::SHORT_INPUT => Some(Error::InvalidArgument {
                name: "x",
                reason: format!("rank {rank}: {} has {} rows but {} were received", phase::name(rec.phase), rec.expected, rec.seen),
            }),
            status::BAD_INDEX => Some(Error::BadIndex {
                rank,
                phase: phase::name(rec.phase),
                what: moe_ep_kernels::abi::bad_index::name(rec.waited_ns),
                value: rec.seen,
                limit: rec.expected,
                source_rank: rec.peer as usize,
            }),
            _ => Some(Error::Device { rank, record: *rec }),
        }
    }
}

/// Adds "while ..." context to driver results.
pub(crate) trait DriverContext<T> {
    fn during(self, op: &'static str, during: impl FnOnce() -> String) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, DriverError> {
    fn during(self, op: &'static str, during: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Driver { op, during: during(), source })
    }
}
