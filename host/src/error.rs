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
    /// No usable CUDA driver or GPU on this machine.
    #[error("no GPU available: {reason}")]
    NoDevice { reason: String },

    /// A CUDA driver call failed.
    #[error("CUDA driver call {op} failed while {during}: {source}")]
    Driver {
        op: &'static str,
        during: String,
        #[source]
        source: DriverError,
    },

    /// An argument is out of range or inconsistent; nothing was launched.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument { name: &'static str, reason: String },

    /// Two ranks' GPUs cannot reach each other over P2P.
    #[error(
        "rank {rank_a} (GPU {device_a}) cannot access rank {rank_b} (GPU {device_b}) over peer-to-peer; every pair of GPUs in a group must be NVLink (or PCIe P2P) peers"
    )]
    NoPeerAccess { rank_a: usize, device_a: usize, rank_b: usize, device_b: usize },

    /// The rendezvous (handle exchange between ranks) failed.
    #[error("rendezvous (rank {rank} of {world}): {reason}")]
    Rendezvous { rank: usize, world: usize, reason: String },

    /// A kernel's spin-wait passed its deadline.
    #[error(
        "rank {rank} timed out in {phase} after {waited:?} waiting for rank {peer} (expected {expected}, saw {seen}); the group's GPU state is undefined, drop it"
    )]
    Timeout { rank: usize, phase: &'static str, peer: usize, expected: u64, seen: u64, waited: Duration },

    /// A rank would receive more rows than its receive buffer holds.
    #[error(
        "rank {receiver} would receive {needed} rows but its receive buffer holds {capacity} (reported by rank {rank}); raise the buffer's receive capacity"
    )]
    CapacityExceeded { rank: usize, receiver: usize, needed: u64, capacity: u64 },

    /// A routing entry is outside `[-1, num_experts)`.
    #[error("rank {rank}: topk_idx of token {token} holds {value}, outside [-1, {num_experts})")]
    InvalidExpert { rank: usize, token: usize, value: i64, num_experts: u64 },

    /// An operation was called out of order (e.g. a handle from an older dispatch).
    #[error("{reason}")]
    InvalidState { reason: String },

    /// Ranks passed different values to a collective call that needs the same on every rank
    /// (a buffer's configuration, its launch sizes).
    #[error("{what} differs across ranks: rank {rank} has {value}, rank {other_rank} has {other_value}; every rank must pass the same")]
    CollectiveMismatch { what: &'static str, rank: usize, value: String, other_rank: usize, other_value: String },

    /// The device reported an error code this library does not know (a bug).
    #[error("rank {rank}: unknown device error record {record:?}")]
    Device { rank: usize, record: ErrorRecord },
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
            status::CAPACITY => Some(Error::CapacityExceeded { rank, receiver: rec.peer as usize, needed: rec.seen, capacity: rec.expected }),
            status::BAD_EXPERT => Some(Error::InvalidExpert { rank, token: rec.peer as usize, value: rec.seen as i64, num_experts: rec.expected }),
            status::SHORT_INPUT => Some(Error::InvalidArgument {
                name: "x",
                reason: format!("rank {rank}: {} has {} rows but {} were received", phase::name(rec.phase), rec.expected, rec.seen),
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
