//! # moe-ep
//!
//! Expert-parallel dispatch and combine for Mixture-of-Experts inference on NVIDIA Hopper GPUs
//! over NVLink, written entirely in Rust: the kernels are the `moe-ep-kernels` crate compiled
//! to PTX by rustc's NVPTX back end and embedded in this library ([`PTX`]).
//!
//! ## Layers
//!
//! - [`Group`]: one member per GPU (a process per GPU over TCP and CUDA IPC, or a thread per
//!   GPU in one process), with its context, stream, kernels and device error record. For
//!   development on one GPU, several process ranks may share it under CUDA MPS
//!   ([`GroupConfig::share_gpu`]), each with its share of the SMs.
//! - [`SymmetricHeap`]: same-size device buffers on every rank, each mapped everywhere.
//! - [`ht`]: high-throughput dispatch and combine (prefill): counts exchanged first, compact
//!   deterministic outputs.
//! - [`ll`]: low-latency dispatch and combine (decode): no count round trip, fixed addresses,
//!   CUDA-graph safe.
//! - `reference` (feature `testing`): the CPU reference every test compares against.
//! - `diag` (feature `testing`): foundation checks and probes (heap round trip, deadlines, P2P
//!   limits).
//! - `launch` (feature `testing`): a group's ranks as local processes, one GPU each or all
//!   sharing one under CUDA MPS.
//!
//! The `testing` feature also exposes the kernels' ABI (`abi`); it is for this crate's tests
//! and benchmark, not part of the stable API (and it pulls in rayon).
//!
//! ## Safety model
//!
//! The public API is safe and never takes raw device pointers: inputs are cudarc slices
//! checked for shape before anything is launched, outputs that live in the heap are views whose
//! lifetime ends before the next operation may overwrite them. Raw driver calls live in
//! `driver`, kernel launches in `Group::launch`; every spin-wait on the GPU has a deadline that
//! comes back as [`Error::Timeout`] naming the rank and phase, so nothing hangs.
//!
//! ## Failure
//!
//! Kernels report what goes wrong (a timeout, a bad expert id, an overflowing receive buffer)
//! in the rank's error record and end; they never trap. The host learns it from
//! [`Group::check`] (which synchronises the context) or [`Group::poll_error`] (which does not).
//! From then on the group is failed: its buffers' GPU state (counters, flags, rows) is
//! undefined, so every later operation returns [`Error::GroupFailed`] naming the first cause
//! instead of running. Drop the buffers and the group and build new ones.
//!
//! Failure is fast across ranks: a rank's failure is announced to its peers at once, a peer
//! whose process dies is noticed when its rendezvous connection closes, and
//! [`Group::abort`] stops every rank on purpose. Each rank's GPU waits poll a host-mapped abort
//! flag, so they stop within milliseconds with [`Error::PeerFailed`] naming the rank at fault
//! (not at their deadline), and the group is failed on every rank. Arguments that live on
//! another stream than the operation's are ordered around its launch ([`DeviceArg`]).

#![deny(missing_docs)]

mod driver;
mod error;
mod group;
mod heap;
#[cfg(feature = "testing")]
pub mod launch;
mod tensor;
#[cfg(feature = "testing")]
mod timing;
mod watchdog;
mod work;

#[cfg(feature = "testing")]
pub mod diag;
pub mod ht;
pub mod ll;
#[cfg(feature = "nvshmem")]
pub mod nvshmem;
#[cfg(feature = "testing")]
pub mod reference;
pub mod rendezvous;

pub use error::{Error, Result};
pub use group::{Group, GroupConfig, Kernel, NODE_ENV, PTX, SHARE_GPU_ENV, SM_BUDGET_ENV, device_count, mps_control_pipe};
pub use heap::{Mode, SymmetricHeap};
/// The kernels' ABI (parameter blocks, heap layouts, error records), for tests and tools
/// (`testing` feature).
#[cfg(feature = "testing")]
pub use moe_ep_kernels::abi;
pub use tensor::{DeviceArg, HeapView, TopkIdx};
#[cfg(feature = "testing")]
pub use timing::time_ms;
