//! `moe_ep._moe_ep`: the Python extension under the `moe_ep` package.
//!
//! One file per concern:
//! - `group.rs`: [`PyGroup`], one rank; it rendezvouses over moe-ep's own TCP exchange
//!   (`Group.connect`) or over a Python `all_gather(bytes) -> list[bytes]`.
//! - `tensors.rs`: how torch tensors are checked and read, and DLPack views of the buffers.
//! - `ll.rs`: [`PyLowLatency`], the low-latency buffer, on torch tensors (read through `data_ptr`, checked
//!   first: dtype, device, shape, contiguity), on the caller's stream (torch's current one);
//!   received rows come back as DLPack capsules viewing the buffer's memory.
//! - `ht.rs`: [`PyHighThroughput`], the high-throughput buffer (layout, dispatch, cached dispatch,
//!   combine), likewise; received rows come back as DLPack views, exact in size (the host waits
//!   for the counts).
//! - `deep_ep.rs`: [`PyDeepEpBase`], the base of `moe_ep.deep_ep.Buffer`: DeepEP's two
//!   low-latency calls with its signatures, one extension call each; DeepEP's `EventOverlap`.
//! - `profile.rs`: named stage marks of a low-latency call, off unless switched on (overhead.py).
//! - `errors.rs`: errors become exceptions of one hierarchy ([`MoeEpError`]) carrying `kind`, `argument`,
//!   `rank`, `phase` and `peer` where the library's error has them.

mod clock;
mod deep_ep;
mod errors;
mod group;
mod ht;
mod live;
mod ll;
mod nvshmem;
mod profile;
mod tensors;
mod torch_shim;

use deep_ep::{PyDeepEpBase, PyEventOverlap, PyLlHook};
use errors::*;
use group::{_share_gpu_env, PyGroup};
use ht::{PyHighThroughput, PyHtHandle, PyHtLayout};
use ll::{PyLlCombinePending, PyLlHandle, PyLlViews, PyLowLatency};
use pyo3::prelude::*;
use tensors::{_shim_layout_proven, check_tensor_py, tensor_path};

/// Number of CUDA devices (raises `NoDevice` without a driver).
#[pyfunction]
fn device_count() -> PyResult<usize> {
    moe_ep::device_count().map_err(py_err)
}

/// Symmetric-heap bytes per rank of a low-latency buffer (a size hint).
#[pyfunction]
fn ll_heap_bytes(world: usize, num_experts: usize, hidden: usize, max_topk: usize, max_tokens_per_rank: usize) -> PyResult<u64> {
    let cfg = moe_ep::ll::LlConfig::new(num_experts, hidden, max_topk, max_tokens_per_rank);
    cfg.validate(world, u32::MAX).map_err(py_err)?;
    Ok(cfg.heap_bytes(world))
}

/// Symmetric-heap bytes per rank of a high-throughput buffer (a size hint).
#[pyfunction]
fn ht_heap_bytes(world: usize, num_experts: usize, hidden: usize, max_topk: usize, max_tokens_per_rank: usize) -> PyResult<u64> {
    let cfg = moe_ep::ht::HtConfig::new(num_experts, hidden, max_topk, max_tokens_per_rank, world);
    cfg.validate(world, u32::MAX).map_err(py_err)?;
    Ok(cfg.heap_bytes(world))
}

/// `(major, minor, patch, init status)` of the NVSHMEM the process set up for a low-latency
/// buffer with `transport="nvshmem"` (status 2: initialised, 3: NVSHMEM's limited
/// multi-process-per-GPU mode, 4: the full one), or `None` before.
#[pyfunction]
fn nvshmem_status(py: Python<'_>) -> Option<(i32, i32, i32, i32)> {
    // Without the GIL: another thread may hold NVSHMEM's slot while it sets NVSHMEM up over a
    // group whose exchange calls back into Python.
    py.allow_threads(nvshmem::status)
}

#[pymodule]
fn _moe_ep(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MoeEpError", py.get_type::<MoeEpError>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("NoDevice", py.get_type::<NoDevice>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("PeerFailed", py.get_type::<PeerFailed>())?;
    m.add("GroupFailed", py.get_type::<GroupFailed>())?;
    m.add_class::<PyGroup>()?;
    m.add_class::<PyLowLatency>()?;
    m.add_class::<PyLlHandle>()?;
    m.add_class::<PyLlViews>()?;
    m.add_class::<PyLlCombinePending>()?;
    m.add_class::<PyDeepEpBase>()?;
    m.add_class::<PyEventOverlap>()?;
    m.add_class::<PyLlHook>()?;
    m.add_class::<PyHighThroughput>()?;
    m.add_class::<PyHtLayout>()?;
    m.add_class::<PyHtHandle>()?;
    m.add_function(wrap_pyfunction!(device_count, m)?)?;
    m.add_function(wrap_pyfunction!(ll_heap_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(nvshmem_status, m)?)?;
    m.add_function(wrap_pyfunction!(crate::nvshmem::nvshmem_module, m)?)?;
    m.add_function(wrap_pyfunction!(ht_heap_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(check_tensor_py, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_path, m)?)?;
    m.add_function(wrap_pyfunction!(_shim_layout_proven, m)?)?;
    m.add_function(wrap_pyfunction!(_share_gpu_env, m)?)?;
    m.add_function(wrap_pyfunction!(profile::_profile, m)?)?;
    m.add_function(wrap_pyfunction!(profile::_stages, m)?)?;
    Ok(())
}
