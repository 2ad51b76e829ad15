//! `Group`: one rank, its rendezvous (moe-ep's TCP exchange, or a Python all-gather).

use crate::errors::*;
use cudarc::driver::sys;
use moe_ep::rendezvous::{Exchange, ProcessConfig, Secret};
use moe_ep::{Error, Group, GroupConfig};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use std::sync::Arc;
use std::time::Duration;

/// The rendezvous over a Python callable `all_gather(bytes) -> list[bytes]`.
pub(crate) struct PyExchange {
    rank: usize,
    world: usize,
    all_gather: Py<PyAny>,
}

impl Exchange for PyExchange {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather(&self, data: &[u8], _timeout: Duration) -> moe_ep::Result<Vec<Vec<u8>>> {
        let err = |reason: String| Error::Rendezvous { rank: self.rank, world: self.world, reason };
        Python::with_gil(|py| {
            let r = self.all_gather.call1(py, (PyBytes::new(py, data),)).map_err(|e| err(format!("the all_gather callable raised {e}")))?;
            let list = r.downcast_bound::<PyList>(py).map_err(|_| err("the all_gather callable returned no list".into()))?;
            let items: Vec<Vec<u8>> = list.extract().map_err(|e| err(format!("the all_gather callable returned {e}")))?;
            if items.len() != self.world {
                return Err(err(format!("the all_gather callable returned {} entries for {} ranks", items.len(), self.world)));
            }
            Ok(items)
        })
    }
}

/// A group's settings from Python: the deadlines (checked), then the environment's
/// `MOE_EP_SHARE_GPU` / `MOE_EP_SM_BUDGET` (several ranks on one GPU under CUDA MPS).
pub(crate) fn group_config(timeout_s: f64, rendezvous_timeout_s: f64) -> PyResult<GroupConfig> {
    for (name, v) in [("timeout_s", timeout_s), ("rendezvous_timeout_s", rendezvous_timeout_s)] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(invalid(name, format!("{v} is not a positive number of seconds")));
        }
    }
    GroupConfig {
        timeout: Duration::from_secs_f64(timeout_s),
        rendezvous_timeout: Duration::from_secs_f64(rendezvous_timeout_s),
        ..GroupConfig::default()
    }
    .with_env()
    .map_err(py_err)
}

/// Whether the environment opts this process into sharing its GPU (`MOE_EP_SHARE_GPU`, read
/// as the library reads it; a malformed value raises `InvalidArgument`).
#[pyfunction]
pub(crate) fn _share_gpu_env() -> PyResult<bool> {
    Ok(GroupConfig::default().with_env().map_err(py_err)?.share_gpu)
}

/// One rank of a group (one process per GPU), whose rendezvous runs over `all_gather`.
#[pyclass(name = "Group", module = "moe_ep._moe_ep")]
pub(crate) struct PyGroup {
    pub(crate) g: Group,
}

#[pymethods]
impl PyGroup {
    /// `Group(rank, world, device, all_gather, timeout_s=10.0)`: collective over the ranks;
    /// `all_gather(bytes) -> list[bytes]` must gather one blob per rank, in rank order.
    #[new]
    #[pyo3(signature = (rank, world, device, all_gather, timeout_s = 10.0))]
    fn new(rank: usize, world: usize, device: usize, all_gather: Py<PyAny>, timeout_s: f64) -> PyResult<Self> {
        let cfg = group_config(timeout_s, GroupConfig::default().rendezvous_timeout.as_secs_f64())?;
        let ex: Arc<dyn Exchange> = Arc::new(PyExchange { rank, world, all_gather });
        Ok(PyGroup { g: Group::with_exchange(ex, device, cfg).map_err(py_err)? })
    }

    /// `Group.connect(rank, world, device, master_addr, master_port, secret, timeout_s=10.0,
    /// rendezvous_timeout_s=120.0)`: collective; the ranks meet over moe-ep's own TCP
    /// rendezvous (rank 0 listens on `master_addr:master_port`; every rank proves it knows
    /// `secret`). Unlike the `all_gather` form, the group then watches its peers: a peer that
    /// dies, fails or aborts stops this rank's GPU waits at once and fails the group.
    #[staticmethod]
    #[pyo3(signature = (rank, world, device, master_addr, master_port, secret, timeout_s = 10.0, rendezvous_timeout_s = 120.0))]
    #[allow(clippy::too_many_arguments)]
    fn connect(
        py: Python<'_>,
        rank: usize,
        world: usize,
        device: usize,
        master_addr: String,
        master_port: u16,
        secret: String,
        timeout_s: f64,
        rendezvous_timeout_s: f64,
    ) -> PyResult<Self> {
        let cfg = group_config(timeout_s, rendezvous_timeout_s)?;
        let pc = ProcessConfig { rank, world, device, master_addr, master_port, secret: Secret(secret) };
        // The rendezvous waits for the other ranks: without the GIL, so their Python threads
        // (and this process's) keep running.
        let g = py.allow_threads(|| Group::connect(&pc, cfg)).map_err(py_err)?;
        Ok(PyGroup { g })
    }

    /// What failed the group, or `None`: a peer that died, failed or aborted, or an error this
    /// rank's kernels reported. A read of host memory (no synchronisation): call it after a
    /// step's work has finished (e.g. after `torch.cuda.synchronize()` or an event, or between
    /// CUDA-graph replays) to know whether that step's outputs can be used.
    fn failure(&self) -> Option<String> {
        self.g.failure()
    }

    #[getter]
    fn rank(&self) -> usize {
        self.g.rank()
    }
    #[getter]
    fn world(&self) -> usize {
        self.g.world()
    }
    #[getter]
    fn device(&self) -> usize {
        self.g.device()
    }
    #[getter]
    fn device_name(&self) -> String {
        self.g.device_name().to_string()
    }
    /// SMs this rank's kernels may use (its share where ranks share a GPU).
    #[getter]
    fn sm_count(&self) -> u32 {
        self.g.sm_count()
    }
    /// Collective: the smallest SM share of every rank (a grid every rank can launch).
    fn min_sm_count(&self, py: Python<'_>) -> PyResult<u32> {
        py.allow_threads(|| self.g.min_sm_count()).map_err(py_err)
    }
    /// Ranks on this rank's GPU (1 unless `MOE_EP_SHARE_GPU=1` let processes share it).
    #[getter]
    fn gpu_sharers(&self) -> usize {
        self.g.gpu_sharers()
    }
    /// Every rank's node, numbered in the order of each node's first rank (`MOE_EP_NODE`, else
    /// the kernel's boot id, names a node).
    #[getter]
    fn nodes(&self) -> Vec<u32> {
        self.g.nodes().to_vec()
    }
    /// Whether the ranks are on more than one node: then only low-latency buffers in NVSHMEM's
    /// memory run (the default transport there).
    #[getter]
    fn spans_nodes(&self) -> bool {
        self.g.spans_nodes()
    }

    /// Waits for this rank's kernels and raises what a kernel reported.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.g.check()).map_err(py_err)
    }

    /// Queues a GPU barrier of the whole group on `stream` (a raw CUstream, e.g. torch's
    /// `current_stream().cuda_stream`): work queued after it starts on every rank together.
    /// Every rank must queue the group's barriers in the same order. (The benchmarks time
    /// each operation from one.)
    fn launch_barrier(&self, stream: usize) -> PyResult<()> {
        let s = stream_of(&self.g, stream);
        self.g.launch_barrier(&s, 1).map_err(py_err)
    }

    /// Stops every rank's GPU waits (they raise `PeerFailed` naming this rank).
    fn abort(&self, reason: &str) {
        self.g.abort(reason)
    }

    /// Bytes of this rank's memory kept for buffers dropped without `destroy` (until every rank
    /// has dropped them).
    fn quarantined_bytes(&self) -> usize {
        self.g.quarantined_bytes()
    }

    /// Collective: frees what every rank has dropped; returns the bytes this rank freed.
    fn reclaim_dropped(&self, py: Python<'_>) -> PyResult<usize> {
        py.allow_threads(|| self.g.reclaim_dropped()).map_err(py_err)
    }
}

pub(crate) fn stream_of(g: &Group, stream: usize) -> Arc<cudarc::driver::CudaStream> {
    // SAFETY: `stream` is a torch CUDA stream of this device (the Python layer passes torch's
    // current raw stream), owned by torch and alive during the call; the
    // group uses the device's primary context, as torch does.
    unsafe { g.context().wrap_borrowed_stream(stream as sys::CUstream) }
}
