//! `moe_ep._moe_ep`: the Python extension under the `moe_ep` package.
//!
//! - [`PyGroup`]: a group whose rendezvous runs over a Python `all_gather(bytes) -> list[bytes]`
//!   (the package builds it on `torch.distributed.all_gather_object`, so it needs no port).
//! - [`PyLowLatency`]: the low-latency buffer, on torch tensors (read through `data_ptr`, checked
//!   first: dtype, device, shape, contiguity), on the caller's stream (torch's current one);
//!   received rows come back as DLPack capsules viewing the buffer's memory.
//! - [`PyHighThroughput`]: the high-throughput buffer (layout, dispatch, cached dispatch,
//!   combine), likewise; received rows come back as DLPack views, exact in size (the host waits
//!   for the counts).
//! - Errors become exceptions of one hierarchy ([`MoeEpError`]) carrying `kind`, `argument`,
//!   `rank`, `phase` and `peer` where the library's error has them.

use cudarc::driver::sys;
use half::bf16;
use moe_ep::ht::{self, HtBuffer, HtConfig, Layout};
use moe_ep::ll::{CombineArgs, CombineInput, CombineMode, DispatchArgs, Handle, LlBuffer, LlConfig, Payload, ScaleFormat, ScaleLayout};
use moe_ep::rendezvous::{Exchange, ProcessConfig, Secret};
use moe_ep::{DeviceArg, Error, Group, GroupConfig, TopkIdx};
use pyo3::create_exception;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod torch_shim;

create_exception!(
    _moe_ep,
    MoeEpError,
    pyo3::exceptions::PyRuntimeError,
    "Every moe-ep error: `kind`, and where known `argument`, `rank`, `phase`, `peer`."
);
create_exception!(
    _moe_ep,
    InvalidArgument,
    MoeEpError,
    "An argument is out of range or a tensor has the wrong dtype, device, shape or layout; nothing was launched."
);
create_exception!(_moe_ep, NoDevice, MoeEpError, "No usable CUDA driver or GPU.");
create_exception!(_moe_ep, Timeout, MoeEpError, "A GPU wait passed its deadline (`rank` waited for `peer` in `phase`).");
create_exception!(_moe_ep, PeerFailed, MoeEpError, "A GPU wait stopped because rank `peer` failed; the group is failed.");
create_exception!(_moe_ep, GroupFailed, MoeEpError, "An earlier error failed the group; build a new one.");

/// The library's error as a Python exception with its fields as attributes.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    let kind = format!("{e:?}").split([' ', '{', '(']).next().unwrap_or("").to_string();
    let (err, argument, rank, phase, peer): (PyErr, Option<&str>, Option<usize>, Option<&str>, Option<usize>) = match &e {
        Error::InvalidArgument { name, .. } => (InvalidArgument::new_err(msg), Some(name), None, None, None),
        Error::NoDevice { .. } => (NoDevice::new_err(msg), None, None, None, None),
        Error::Timeout { rank, phase, peer, .. } => (Timeout::new_err(msg), None, Some(*rank), Some(phase), Some(*peer)),
        Error::PeerFailed { rank, phase, peer, .. } => (PeerFailed::new_err(msg), None, Some(*rank), Some(phase), Some(*peer)),
        Error::GroupFailed { .. } => (GroupFailed::new_err(msg), None, None, None, None),
        Error::HostWaitTimeout { rank, .. } => (Timeout::new_err(msg), None, Some(*rank), None, None),
        Error::BadIndex { rank, phase, source_rank, .. } => (MoeEpError::new_err(msg), None, Some(*rank), Some(phase), Some(*source_rank)),
        _ => (MoeEpError::new_err(msg), None, None, None, None),
    };
    with_fields(err, &kind, argument, rank, phase, peer)
}

/// A call on a buffer after its `destroy`.
fn destroyed() -> PyErr {
    with_fields(MoeEpError::new_err("the buffer was destroyed"), "Destroyed", None, None, None, None)
}

fn invalid(argument: &str, msg: String) -> PyErr {
    with_fields(InvalidArgument::new_err(format!("invalid argument `{argument}`: {msg}")), "InvalidArgument", Some(argument), None, None, None)
}

/// Sets the fields every moe-ep exception carries (None where the error has no such field).
fn with_fields(err: PyErr, kind: &str, argument: Option<&str>, rank: Option<usize>, phase: Option<&str>, peer: Option<usize>) -> PyErr {
    Python::with_gil(|py| {
        let v = err.value(py);
        let _ = v.setattr("kind", kind);
        let _ = v.setattr("argument", argument);
        let _ = v.setattr("rank", rank);
        let _ = v.setattr("phase", phase);
        let _ = v.setattr("peer", peer);
    });
    err
}

/// What the extension reads of a torch tensor.
type TensorInfo = torch_shim::Meta;

/// The name of a dtype object. torch's dtypes are singletons, so their names are read once
/// and found again by identity (a few dtypes; anything past the cache is read each time).
fn dtype_name(d: &Bound<'_, PyAny>) -> PyResult<String> {
    static SEEN: std::sync::Mutex<Vec<(Py<PyAny>, String)>> = std::sync::Mutex::new(Vec::new());
    let seen = || SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, n)) = seen().iter().find(|(o, _)| o.as_ptr() == d.as_ptr()) {
        return Ok(n.clone());
    }
    // Python runs with the lock released (a `__str__` in Python may switch threads).
    let n = d.str()?.to_string();
    if d.get_type().name().is_ok_and(|t| t == "dtype") {
        let mut s = seen();
        if s.len() < 16 && !s.iter().any(|(o, _)| o.as_ptr() == d.as_ptr()) {
            s.push((d.clone().unbind(), n.clone()));
        }
    }
    Ok(n)
}

/// Reads what [`check`] needs of `t`: through torch's C shim where it applies (see
/// [`torch_shim`]), else through its attributes.
fn tensor_info(name: &str, t: &Bound<'_, PyAny>) -> PyResult<TensorInfo> {
    match torch_shim::read(t, || attribute_meta(name, t))? {
        Some(m) => Ok(m),
        None => attribute_meta(name, t),
    }
}

/// The attribute path: six attribute reads (names interned); strings are built only when the
/// check fails.
pub(crate) fn attribute_meta(name: &str, t: &Bound<'_, PyAny>) -> PyResult<TensorInfo> {
    let py = t.py();
    let not_tensor = |_| invalid(name, format!("expected a torch tensor, got {}", t.get_type().name().map(|n| n.to_string()).unwrap_or_default()));
    Ok(TensorInfo {
        ptr: t.call_method0(intern!(py, "data_ptr")).and_then(|v| v.extract()).map_err(not_tensor)?,
        shape: t.getattr(intern!(py, "shape")).and_then(|s| s.extract()).map_err(not_tensor)?,
        dtype: t.getattr(intern!(py, "dtype")).and_then(|d| dtype_name(&d)).map_err(not_tensor)?.into(),
        is_cuda: t.getattr(intern!(py, "is_cuda")).and_then(|c| c.extract()).map_err(not_tensor)?,
        device_index: t.call_method0(intern!(py, "get_device")).and_then(|i| i.extract()).map_err(not_tensor)?,
        contiguous: t.call_method0(intern!(py, "is_contiguous")).and_then(|c| c.extract()).map_err(not_tensor)?,
    })
}

/// Checks `t` against what an operation needs: one of `dtypes`, a contiguous CUDA tensor on
/// GPU `device`, and `shape` (`None` entries take any size). Returns what it read.
fn check(name: &str, t: &Bound<'_, PyAny>, dtypes: &[&str], shape: &[Option<usize>], device: i64) -> PyResult<TensorInfo> {
    let i = tensor_info(name, t)?;
    let shape_ok = i.shape.len() == shape.len() && i.shape.iter().zip(shape).all(|(g, w)| w.is_none_or(|w| *g == w));
    if dtypes.contains(&&*i.dtype) && i.is_cuda && i.device_index == device && i.contiguous && shape_ok {
        return Ok(i);
    }
    let want_shape = shape.iter().map(|d| d.map_or("*".to_string(), |v| v.to_string())).collect::<Vec<_>>().join(", ");
    let want = format!("a contiguous {} tensor of shape [{want_shape}] on cuda:{device}", dtypes.join(" or "));
    let place = t.getattr("device").and_then(|d| d.str()).map(|s| s.to_string()).unwrap_or_else(|_| "an unknown device".into());
    let got = format!("a {}{} tensor of shape {:?} on {place}", if i.contiguous { "" } else { "non-contiguous " }, i.dtype, i.shape);
    Err(invalid(name, format!("expected {want}, got {got}")))
}

/// Exposed for tests (and tools): the check every entry point runs on its tensors.
#[pyfunction]
#[pyo3(name = "check_tensor")]
fn check_tensor_py(name: &str, t: &Bound<'_, PyAny>, dtypes: Vec<String>, shape: Vec<Option<usize>>, device: i64) -> PyResult<()> {
    let d: Vec<&str> = dtypes.iter().map(|s| s.as_str()).collect();
    check(name, t, &d, &shape, device).map(|_| ())
}

/// Which path reads torch tensors' metadata in this process (torch's C shim, or the tensors'
/// attributes, with the reason), after setting it up if no tensor was read yet.
#[pyfunction]
fn tensor_path(py: Python<'_>) -> String {
    torch_shim::describe(py)
}

/// Exposed for tests: whether the tensor fast path is taken on torch `version`.
#[pyfunction]
fn _shim_layout_proven(version: &str) -> bool {
    torch_shim::layout_proven(version)
}

/// A checked torch tensor as a device argument.
struct Raw<T> {
    ptr: u64,
    elems: usize,
    _t: PhantomData<T>,
}

impl<T> Raw<T> {
    fn of(i: &TensorInfo) -> Self {
        Raw { ptr: i.ptr, elems: i.shape.iter().product(), _t: PhantomData }
    }
}

// SAFETY: `ptr` is the data of a contiguous CUDA tensor of `elems` elements of `T` on the
// group's GPU (checked by `check`); the Python caller holds the tensor for the call, and the
// operation runs on the caller's stream (torch's current one), on which torch orders the
// tensor's reuse (a tensor from another stream needs `record_stream`, as with any kernel).
unsafe impl<T> DeviceArg<T> for Raw<T> {
    fn device_addr(&self) -> u64 {
        self.ptr
    }
    fn elems(&self) -> usize {
        self.elems
    }
}

/// The rendezvous over a Python callable `all_gather(bytes) -> list[bytes]`.
struct PyExchange {
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
fn group_config(timeout_s: f64, rendezvous_timeout_s: f64) -> PyResult<GroupConfig> {
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
fn _share_gpu_env() -> PyResult<bool> {
    Ok(GroupConfig::default().with_env().map_err(py_err)?.share_gpu)
}

/// One rank of a group (one process per GPU), whose rendezvous runs over `all_gather`.
#[pyclass(name = "Group", module = "moe_ep._moe_ep")]
struct PyGroup {
    g: Group,
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
    /// Ranks on this rank's GPU (1 unless `MOE_EP_SHARE_GPU=1` let processes share it).
    #[getter]
    fn gpu_sharers(&self) -> usize {
        self.g.gpu_sharers()
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

/// The handle of one low-latency dispatch.
#[pyclass(name = "LowLatencyHandle", module = "moe_ep._moe_ep")]
struct PyLlHandle {
    h: Handle,
    num_tokens: usize,
    fp8: bool,
    ue8m0: bool,
    column_major: bool,
}

#[pymethods]
impl PyLlHandle {
    /// What the received views depend on: `(half, fp8, ue8m0, column_major)`. Views of equal
    /// keys are the same memory, so the package makes them once per key.
    #[getter]
    fn view_key(&self) -> (usize, bool, bool, bool) {
        (self.h.half(), self.fp8, self.ue8m0, self.column_major)
    }
}

/// A hook-mode low-latency combine whose receive half has not run.
#[pyclass(name = "LowLatencyCombinePending", module = "moe_ep._moe_ep", unsendable)]
struct PyLlCombinePending {
    pending: Option<moe_ep::ll::CombinePending<'static>>,
    /// The tensors the receive half reads and writes (`topk_idx`, `topk_weights`, `out`),
    /// kept alive by this object (see `combine`'s SAFETY comment).
    _tensors: Vec<Py<PyAny>>,
}

/// The low-latency buffer (decode): dispatch and combine on torch tensors. Used from the thread
/// that made it (as a rank's serving loop does).
#[pyclass(name = "LowLatencyBuffer", module = "moe_ep._moe_ep", unsendable)]
struct PyLowLatency {
    g: Group,
    /// `None` once destroyed.
    buf: Option<LlBuffer>,
    /// CPU microseconds the last dispatch or combine spent in the Rust API (the launch), so
    /// the binding's own share of a call can be measured in the same process.
    last_api_us: f64,
}

fn stream_of(g: &Group, stream: usize) -> Arc<cudarc::driver::CudaStream> {
    // SAFETY: `stream` is a torch CUDA stream of this device (the Python layer passes torch's
    // current raw stream), owned by torch and alive during the call; the
    // group uses the device's primary context, as torch does.
    unsafe { g.context().wrap_borrowed_stream(stream as sys::CUstream) }
}

impl PyLowLatency {
    fn buf(&self) -> PyResult<&LlBuffer> {
        self.buf.as_ref().ok_or_else(destroyed)
    }
    fn buf_mut(&mut self) -> PyResult<&mut LlBuffer> {
        self.buf.as_mut().ok_or_else(destroyed)
    }
}

#[pymethods]
impl PyLowLatency {
    /// Collective: releases the buffer on every rank (DeepEP's `destroy`); the GIL is released
    /// while it waits. Dropping it instead runs no collective (its memory is kept until every
    /// rank has dropped it).
    fn destroy(&mut self, py: Python<'_>) -> PyResult<()> {
        let buf = self.buf.take().ok_or_else(destroyed)?;
        py.allow_threads(|| buf.destroy()).map_err(py_err)
    }

    /// `LowLatencyBuffer(group, num_experts, hidden, max_topk, max_tokens_per_rank)`: collective.
    #[new]
    fn new(group: &PyGroup, num_experts: usize, hidden: usize, max_topk: usize, max_tokens_per_rank: usize) -> PyResult<Self> {
        let buf = LlBuffer::new(&group.g, LlConfig::new(num_experts, hidden, max_topk, max_tokens_per_rank)).map_err(py_err)?;
        Ok(PyLowLatency { g: group.g.clone(), buf: Some(buf), last_api_us: 0.0 })
    }

    /// Dispatch of `x` (`bf16 [N, hidden]`) by `topk_idx` (`int64 [N, k]`); `topk_weights`
    /// (`float32 [N, k]`) travel with the rows (needed for the pre-reduced combine).
    /// `scale_format`: "f32", "f32_pow2" or "ue8m0" (FP8 only).
    #[pyo3(signature = (stream, x, topk_idx, topk_weights = None, use_fp8 = true, scale_format = "f32", column_major_scales = false, hook = false))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        stream: usize,
        x: &Bound<'_, PyAny>,
        topk_idx: &Bound<'_, PyAny>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        use_fp8: bool,
        scale_format: &str,
        column_major_scales: bool,
        hook: bool,
    ) -> PyResult<PyLlHandle> {
        let dev = self.g.device() as i64;
        let hd = self.buf()?.config().hidden;
        let xi = check("x", x, &["torch.bfloat16"], &[None, Some(hd)], dev)?;
        let n = xi.shape[0];
        let ti = check("topk_idx", topk_idx, &["torch.int64"], &[Some(n), None], dev)?;
        let k = ti.shape[1];
        let wi = topk_weights.map(|w| check("topk_weights", w, &["torch.float32"], &[Some(n), Some(k)], dev)).transpose()?;
        let fmt = match scale_format {
            "f32" => ScaleFormat::F32,
            "f32_pow2" => ScaleFormat::F32Pow2,
            "ue8m0" => ScaleFormat::Ue8m0,
            other => return Err(invalid("scale_format", format!("{other:?} is not one of \"f32\", \"f32_pow2\", \"ue8m0\""))),
        };
        let (xr, tr) = (Raw::<bf16>::of(&xi), Raw::<i64>::of(&ti));
        let wr = wi.as_ref().map(Raw::<f32>::of);
        let args = DispatchArgs {
            topk_weights: wr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
            payload: if use_fp8 { Payload::Fp8(fmt) } else { Payload::Bf16 },
            scale_layout: if column_major_scales { ScaleLayout::ColumnMajor } else { ScaleLayout::RowMajor },
            hook,
            ..DispatchArgs::fp8(&xr, TopkIdx::I64(&tr))
        };
        let s = stream_of(&self.g, stream);
        let t0 = Instant::now();
        let (h, _) = self.buf_mut()?.dispatch(&s, &args).map_err(py_err)?;
        self.last_api_us = t0.elapsed().as_secs_f64() * 1e6;
        Ok(PyLlHandle { h, num_tokens: n, fp8: use_fp8, ue8m0: use_fp8 && fmt == ScaleFormat::Ue8m0, column_major: column_major_scales })
    }

    /// The receive half of a hook-mode dispatch.
    fn dispatch_recv(&mut self, stream: usize, handle: &mut PyLlHandle) -> PyResult<()> {
        let s = stream_of(&self.g, stream);
        self.buf_mut()?.dispatch_recv(&s, &mut handle.h, None).map(|_| ()).map_err(py_err)
    }

    /// DLPack capsules viewing what `handle` received: `(x, scales or None, count, src_info)`.
    /// `x` is `[E_local, R * T, hidden]` (uint8 bytes of FP8 e4m3, or bf16); scales `float32
    /// [E_local, R * T, hidden / 128]` (row-major), `[E_local, hidden / 128, rows]` (column-major)
    /// or int32 words of four UE8M0 bytes; `count` int32 `[E_local]`; `src_info` int32.
    /// The views stay valid until the dispatch after next (two halves).
    fn recv_views(slf: &Bound<'_, Self>, handle: &PyLlHandle) -> PyResult<(PyObject, Option<PyObject>, PyObject, PyObject)> {
        let py = slf.py();
        let me = slf.borrow();
        let (b, h, dev) = (me.buf()?, &handle.h, me.g.device() as i32);
        let epr = b.config().num_experts / me.g.world();
        let rows = me.g.world() * b.config().max_tokens_per_rank;
        let hd = b.config().hidden;
        let owner: Py<PyAny> = slf.clone().into_any().unbind();
        let groups = hd / 128;
        let x = if handle.fp8 {
            let v = b.recv_x_fp8(h).map_err(py_err)?;
            dlpack(py, v.device_addr(), &[epr, rows, hd], DT_U8, dev, owner.clone_ref(py))?
        } else {
            let v = b.recv_x_bf16(h).map_err(py_err)?;
            dlpack(py, v.device_addr(), &[epr, rows, hd], DT_BF16, dev, owner.clone_ref(py))?
        };
        let scales = if !handle.fp8 {
            None
        } else if handle.ue8m0 {
            let v = b.recv_scales_ue8m0(h).map_err(py_err)?;
            let words = groups.div_ceil(4);
            let shape = if handle.column_major { vec![epr, words, b.scale_rows()] } else { vec![epr, rows, words] };
            Some(dlpack(py, v.device_addr(), &shape, DT_I32, dev, owner.clone_ref(py))?)
        } else {
            let v = b.recv_scales(h).map_err(py_err)?;
            let shape = if handle.column_major { vec![epr, groups, b.scale_rows()] } else { vec![epr, rows, groups] };
            Some(dlpack(py, v.device_addr(), &shape, DT_F32, dev, owner.clone_ref(py))?)
        };
        let count = dlpack(py, b.recv_count(h).map_err(py_err)?.device_addr(), &[epr], DT_I32, dev, owner.clone_ref(py))?;
        let src = dlpack(py, b.recv_src_info(h).map_err(py_err)?.device_addr(), &[epr, rows], DT_I32, dev, owner)?;
        Ok((x, scales, count, src))
    }

    /// Combine: expert outputs `x` (`bf16 [E_local, R * T, hidden]`, or None for the buffer's
    /// zero-copy input) back to their homes into `out` (`bf16 [N, hidden]`). Per expert (exact;
    /// needs `topk_weights`), or `pre_reduced` (each expert rank sums its slots first; uses the
    /// weights the dispatch carried).
    /// With `hook`, only the send half runs; the result is the pending receive half for
    /// `combine_recv`, and the caller keeps `topk_idx`, `topk_weights` and `out` alive until
    /// then (the package's hook closure holds them).
    #[pyo3(signature = (stream, handle, x, topk_idx, out, topk_weights = None, pre_reduced = false, hook = false))]
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &mut self,
        stream: usize,
        handle: &PyLlHandle,
        x: Option<&Bound<'_, PyAny>>,
        topk_idx: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        pre_reduced: bool,
        hook: bool,
    ) -> PyResult<Option<PyLlCombinePending>> {
        let dev = self.g.device() as i64;
        let cfg = self.buf()?.config();
        let (n, hd) = (handle.num_tokens, cfg.hidden);
        let epr = cfg.num_experts / self.g.world();
        let rows = self.g.world() * cfg.max_tokens_per_rank;
        let xi = x.map(|x| check("x", x, &["torch.bfloat16"], &[Some(epr), Some(rows), Some(hd)], dev)).transpose()?;
        let ti = check("topk_idx", topk_idx, &["torch.int64"], &[Some(n), None], dev)?;
        let k = ti.shape[1];
        let oi = check("out", out, &["torch.bfloat16"], &[Some(n), Some(hd)], dev)?;
        let wi = topk_weights.map(|w| check("topk_weights", w, &["torch.float32"], &[Some(n), Some(k)], dev)).transpose()?;
        let xr = xi.as_ref().map(Raw::<bf16>::of);
        let (tr, or) = (Raw::<i64>::of(&ti), Raw::<bf16>::of(&oi));
        let wr = wi.as_ref().map(Raw::<f32>::of);
        let args = CombineArgs {
            x: match &xr {
                Some(x) => CombineInput::Tensor(x),
                None => CombineInput::ZeroCopy,
            },
            topk_idx: TopkIdx::I64(&tr),
            topk_weights: wr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
            out: &or,
            mode: if pre_reduced { CombineMode::PreReduced } else { CombineMode::PerExpert },
            hook,
        };
        let s = stream_of(&self.g, stream);
        let t0 = Instant::now();
        let (pending, _) = self.buf()?.combine(&s, &handle.h, &args).map_err(py_err)?;
        self.last_api_us = t0.elapsed().as_secs_f64() * 1e6;
        let tensors = [Some(topk_idx), Some(out), topk_weights].into_iter().flatten().map(|t| t.clone().unbind()).collect();
        // SAFETY: the pending half holds `topk_idx`, `topk_weights` and `out` (torch tensors,
        // which own their memory), so they stay allocated until `combine_recv` has queued the
        // receive half on `stream` and the pending object is dropped; torch's caching allocator
        // orders their later reuse on that same stream (the package runs the hook on the
        // combine's stream) after the receive half.
        Ok(pending.map(|p| PyLlCombinePending { pending: Some(unsafe { p.into_unbound() }), _tensors: tensors }))
    }

    /// CPU microseconds the last `dispatch` or `combine` spent inside the Rust API (checks of
    /// sizes, the parameter block, the launch, the completion event): the rest of a call's
    /// time is the binding's.
    #[getter]
    fn last_api_us(&self) -> f64 {
        self.last_api_us
    }

    /// The receive half of a hook-mode combine (once per pending combine).
    fn combine_recv(&self, stream: usize, pending: &mut PyLlCombinePending) -> PyResult<()> {
        let p = pending.pending.as_mut().ok_or_else(|| invalid("hook", "this combine's receive half has already run".into()))?;
        let s = stream_of(&self.g, stream);
        // A refused call leaves the pending half in place, to run on its own buffer.
        self.buf()?.combine_recv(&s, p).map_err(py_err)?;
        pending.pending = None;
        Ok(())
    }

    /// A DLPack capsule of the zero-copy combine input of `handle` (`bf16 [E_local, R * T,
    /// hidden]`): write the expert outputs there and combine with `x=None`.
    fn combine_input(slf: &Bound<'_, Self>, handle: &PyLlHandle) -> PyResult<PyObject> {
        let py = slf.py();
        let me = slf.borrow();
        let cfg = me.buf()?.config();
        let shape = [cfg.num_experts / me.g.world(), me.g.world() * cfg.max_tokens_per_rank, cfg.hidden];
        let v = me.buf()?.combine_input(&handle.h).map_err(py_err)?;
        dlpack(py, v.device_addr(), &shape, DT_BF16, me.g.device() as i32, slf.clone().into_any().unbind())
    }
}

/// The routing of one high-throughput dispatch (`HighThroughputBuffer.layout`).
#[pyclass(name = "HighThroughputLayout", module = "moe_ep._moe_ep", unsendable)]
struct PyHtLayout {
    layout: Layout,
    device: i32,
    world: usize,
    experts: usize,
}

#[pymethods]
impl PyHtLayout {
    /// Tokens routed.
    #[getter]
    fn num_tokens(&self) -> usize {
        self.layout.num_tokens()
    }
    /// Top-k slots per token.
    #[getter]
    fn k(&self) -> usize {
        self.layout.k()
    }

    /// DLPack capsules `(tokens_per_rank int32 [R], tokens_per_expert int32 [E],
    /// is_token_in_rank uint8 [N, R])`, alive as long as the layout.
    fn views(slf: &Bound<'_, Self>) -> PyResult<(PyObject, PyObject, PyObject)> {
        let py = slf.py();
        let me = slf.borrow();
        let l = &me.layout;
        let owner = || slf.clone().into_any().unbind();
        Ok((
            dlpack(py, l.tokens_per_rank().device_addr(), &[me.world], DT_I32, me.device, owner())?,
            dlpack(py, l.tokens_per_expert().device_addr(), &[me.experts], DT_I32, me.device, owner())?,
            dlpack(py, l.is_token_in_rank().device_addr(), &[l.num_tokens(), me.world], DT_U8, me.device, owner())?,
        ))
    }
}

/// The handle of one high-throughput dispatch (for its views, a cached dispatch, the combine).
#[pyclass(name = "HighThroughputHandle", module = "moe_ep._moe_ep", unsendable)]
struct PyHtHandle {
    h: ht::Handle,
    fp8: bool,
}

#[pymethods]
impl PyHtHandle {
    /// Rows this rank received.
    #[getter]
    fn num_recv(&self) -> Option<usize> {
        self.h.num_recv()
    }
    /// Rows each local expert received (after alignment).
    #[getter]
    fn expert_counts(&self) -> Option<Vec<usize>> {
        self.h.expert_counts().map(|c| c.to_vec())
    }
}

/// The high-throughput buffer (prefill): layout, dispatch, cached dispatch and combine on
/// torch tensors. Used from the thread that made it.
#[pyclass(name = "HighThroughputBuffer", module = "moe_ep._moe_ep", unsendable)]
struct PyHighThroughput {
    g: Group,
    /// `None` once destroyed.
    buf: Option<HtBuffer>,
}

impl PyHighThroughput {
    fn buf(&self) -> PyResult<&HtBuffer> {
        self.buf.as_ref().ok_or_else(destroyed)
    }
    fn buf_mut(&mut self) -> PyResult<&mut HtBuffer> {
        self.buf.as_mut().ok_or_else(destroyed)
    }
}

#[pymethods]
impl PyHighThroughput {
    /// Collective: releases the buffer on every rank; as `LowLatencyBuffer.destroy`.
    fn destroy(&mut self, py: Python<'_>) -> PyResult<()> {
        let buf = self.buf.take().ok_or_else(destroyed)?;
        py.allow_threads(|| buf.destroy()).map_err(py_err)
    }

    /// `HighThroughputBuffer(group, num_experts, hidden, max_topk, max_tokens_per_rank,
    /// num_sms=None)`: collective; `num_sms` defaults to the tuned budget (24), or the rank's SMs
    /// where that is less (ranks sharing a GPU).
    #[new]
    #[pyo3(signature = (group, num_experts, hidden, max_topk, max_tokens_per_rank, num_sms = None))]
    fn new(group: &PyGroup, num_experts: usize, hidden: usize, max_topk: usize, max_tokens_per_rank: usize, num_sms: Option<u32>) -> PyResult<Self> {
        // Every rank's default grid the same: within the smallest share (collective).
        let sms = group.g.min_sm_count().map_err(py_err)?;
        let mut cfg = HtConfig::new(num_experts, hidden, max_topk, max_tokens_per_rank, group.g.world()).fit_sms(sms);
        if let Some(n) = num_sms {
            cfg.num_sms = n;
        }
        let buf = HtBuffer::new(&group.g, cfg).map_err(py_err)?;
        Ok(PyHighThroughput { g: group.g.clone(), buf: Some(buf) })
    }

    /// The routing of `topk_idx` (`int64 [N, k]`, -1 = no expert): counts per rank and
    /// expert, and which ranks each token goes to.
    fn layout(&self, stream: usize, topk_idx: &Bound<'_, PyAny>) -> PyResult<PyHtLayout> {
        let ti = check("topk_idx", topk_idx, &["torch.int64"], &[None, None], self.g.device() as i64)?;
        let tr = Raw::<i64>::of(&ti);
        let s = stream_of(&self.g, stream);
        let layout = self.buf()?.layout(&s, TopkIdx::I64(&tr), ti.shape[1]).map_err(py_err)?;
        Ok(PyHtLayout { layout, device: self.g.device() as i32, world: self.g.world(), experts: self.buf()?.config().num_experts })
    }

    /// Dispatch of `x` (`bf16 [N, hidden]`, or FP8 `float8_e4m3fn [N, hidden]` with `x_scales`
    /// `float32 [N, hidden / 128]`) by `layout`, with `topk_idx` and `topk_weights` travelling
    /// along. With `handle` (an earlier dispatch of the same layout) it is a cached dispatch: no
    /// count exchange. Waits (host) for the counts, so the views are exact.
    #[pyo3(signature = (stream, layout, x, x_scales = None, topk_idx = None, topk_weights = None, expert_alignment = 1, handle = None))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        py: Python<'_>,
        stream: usize,
        layout: &PyHtLayout,
        x: &Bound<'_, PyAny>,
        x_scales: Option<&Bound<'_, PyAny>>,
        topk_idx: Option<&Bound<'_, PyAny>>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        expert_alignment: usize,
        handle: Option<&mut PyHtHandle>,
    ) -> PyResult<Option<PyHtHandle>> {
        let dev = self.g.device() as i64;
        let (n, hd) = (layout.layout.num_tokens(), self.buf()?.config().hidden);
        let k = layout.layout.k();
        let fp8 = x_scales.is_some();
        let xi = check("x", x, if fp8 { &["torch.float8_e4m3fn"] } else { &["torch.bfloat16"] }, &[Some(n), Some(hd)], dev)?;
        let si = x_scales.map(|sc| check("x_scales", sc, &["torch.float32"], &[Some(n), Some(hd / 128)], dev)).transpose()?;
        let ti = topk_idx.map(|t| check("topk_idx", t, &["torch.int64"], &[Some(n), Some(k)], dev)).transpose()?;
        let wi = topk_weights.map(|w| check("topk_weights", w, &["torch.float32"], &[Some(n), Some(k)], dev)).transpose()?;
        let (xb, xq) = (Raw::<bf16>::of(&xi), Raw::<u8>::of(&xi));
        let sr = si.as_ref().map(Raw::<f32>::of);
        let tr = ti.as_ref().map(Raw::<i64>::of);
        let wr = wi.as_ref().map(Raw::<f32>::of);
        let s = stream_of(&self.g, stream);
        if let Some(h) = &handle
            && h.fp8 != fp8
        {
            return Err(invalid("x", "a cached dispatch sends the same payload kind (BF16 or FP8) as its handle's dispatch".into()));
        }
        let buf = self.buf_mut()?;
        let ll = &layout.layout;
        // The dispatch waits (host) for the counts: without the GIL, so other Python threads
        // run meanwhile.
        let r = py.allow_threads(move || {
            let args = ht::DispatchArgs {
                x: match &sr {
                    Some(scales) => ht::Payload::Fp8 { x: &xq, scales },
                    None => ht::Payload::Bf16(&xb),
                },
                topk_idx: tr.as_ref().map(|t| TopkIdx::I64(t)),
                topk_weights: wr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
                expert_alignment,
                wait_for_counts: true,
            };
            match handle {
                Some(h) => buf.cached_dispatch(&s, &mut h.h, &args).map(|_| None),
                None => buf.dispatch(&s, ll, &args).map(|(h, _)| Some(h)),
            }
        });
        Ok(r.map_err(py_err)?.map(|h| PyHtHandle { h, fp8 }))
    }

    /// DLPack capsules of what `handle` received: `(x, scales or None, topk_idx int32 or None,
    /// topk_weights float32 or None, src_idx int32)`, `num_recv` rows each (top-k only when the
    /// dispatch sent them); valid until the next dispatch of this buffer.
    #[allow(clippy::type_complexity)]
    fn recv_views(
        slf: &Bound<'_, Self>,
        handle: &PyHtHandle,
    ) -> PyResult<(PyObject, Option<PyObject>, Option<PyObject>, Option<PyObject>, PyObject)> {
        let py = slf.py();
        let me = slf.borrow();
        let (b, h, dev) = (me.buf()?, &handle.h, me.g.device() as i32);
        let n = h.num_recv().ok_or_else(|| invalid("handle", "its dispatch did not wait for the counts".into()))?;
        let (hd, k) = (b.config().hidden, h.layout().k());
        let owner = || slf.clone().into_any().unbind();
        let x = if handle.fp8 {
            dlpack(py, b.recv_x_fp8(h).map_err(py_err)?.device_addr(), &[n, hd], DT_U8, dev, owner())?
        } else {
            dlpack(py, b.recv_x_bf16(h).map_err(py_err)?.device_addr(), &[n, hd], DT_BF16, dev, owner())?
        };
        let scales =
            if handle.fp8 { Some(dlpack(py, b.recv_scales(h).map_err(py_err)?.device_addr(), &[n, hd / 128], DT_F32, dev, owner())?) } else { None };
        // (The views above checked the handle: an error here means the dispatch sent no top-k.)
        let idx = b.recv_topk_idx(h).ok().map(|v| dlpack(py, v.device_addr(), &[n, k], DT_I32, dev, owner())).transpose()?;
        let wts = b.recv_topk_weights(h).ok().map(|v| dlpack(py, v.device_addr(), &[n, k], DT_F32, dev, owner())).transpose()?;
        Ok((x, scales, idx, wts, dlpack(py, b.recv_src_idx(h).map_err(py_err)?.device_addr(), &[n], DT_I32, dev, owner())?))
    }

    /// Combine: expert outputs `x` (`bf16 [num_recv, hidden]`, in the dispatch's receive order)
    /// back to their homes, summed in rank order into `out` (`bf16 [N, hidden]`); with
    /// `topk_weights` (`float32 [num_recv, k]`), their sums into `out_weights` (`float32 [N, k]`).
    #[pyo3(signature = (stream, handle, x, out, topk_weights = None, out_weights = None, bias = None))]
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &self,
        stream: usize,
        handle: &PyHtHandle,
        x: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        out_weights: Option<&Bound<'_, PyAny>>,
        bias: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let dev = self.g.device() as i64;
        let h = &handle.h;
        let (n, k, hd) = (h.layout().num_tokens(), h.layout().k(), self.buf()?.config().hidden);
        let r = h.num_recv().ok_or_else(|| invalid("handle", "its dispatch did not wait for the counts".into()))?;
        let xi = check("x", x, &["torch.bfloat16"], &[Some(r), Some(hd)], dev)?;
        let oi = check("out", out, &["torch.bfloat16"], &[Some(n), Some(hd)], dev)?;
        let wi = topk_weights.map(|w| check("topk_weights", w, &["torch.float32"], &[Some(r), Some(k)], dev)).transpose()?;
        let owi = out_weights.map(|w| check("out_weights", w, &["torch.float32"], &[Some(n), Some(k)], dev)).transpose()?;
        let bi = bias.map(|b| check("bias", b, &["torch.bfloat16"], &[Some(n), Some(hd)], dev)).transpose()?;
        let (xr, or) = (Raw::<bf16>::of(&xi), Raw::<bf16>::of(&oi));
        let wr = wi.as_ref().map(Raw::<f32>::of);
        let owr = owi.as_ref().map(Raw::<f32>::of);
        let br = bi.as_ref().map(Raw::<bf16>::of);
        let args = ht::CombineArgs {
            x: &xr,
            topk_weights: wr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
            bias: [br.as_ref().map(|b| b as &dyn DeviceArg<bf16>), None],
            out: &or,
            out_weights: owr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
        };
        let s = stream_of(&self.g, stream);
        self.buf()?.combine(&s, h, &args).map(|_| ()).map_err(py_err)
    }
}

// ---------------------------------------------------------------------------------------
// DLPack: views of the buffer's memory as torch tensors (`torch.from_dlpack`)
// ---------------------------------------------------------------------------------------

#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

/// `kDLCUDA`.
const DL_CUDA: i32 = 2;
const DT_U8: DlDataType = DlDataType { code: 1, bits: 8, lanes: 1 };
const DT_I32: DlDataType = DlDataType { code: 0, bits: 32, lanes: 1 };
const DT_F32: DlDataType = DlDataType { code: 2, bits: 32, lanes: 1 };
const DT_BF16: DlDataType = DlDataType { code: 4, bits: 16, lanes: 1 };
const DLTENSOR: &std::ffi::CStr = c"dltensor";

/// What a view keeps alive: its shape array and the buffer object that owns the memory.
struct ViewCtx {
    shape: Vec<i64>,
    _owner: Py<PyAny>,
}

unsafe extern "C" fn dl_deleter(m: *mut DlManagedTensor) {
    // SAFETY: `m` and its context were made by `dlpack` with `Box::into_raw`, and DLPack calls
    // the deleter once.
    unsafe {
        let m = Box::from_raw(m);
        let ctx = Box::from_raw(m.manager_ctx as *mut ViewCtx);
        Python::with_gil(|_| drop(ctx));
    }
}

unsafe extern "C" fn capsule_destructor(cap: *mut pyo3::ffi::PyObject) {
    // SAFETY: a capsule still named "dltensor" was never consumed: its tensor is still ours to
    // delete (a consumer renames it to "used_dltensor").
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(cap, DLTENSOR.as_ptr()) == 1 {
            let m = pyo3::ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()) as *mut DlManagedTensor;
            if let Some(d) = (*m).deleter {
                d(m);
            }
        }
    }
}

/// A DLPack capsule viewing `shape` elements of `dtype` at device address `ptr` of GPU `device`,
/// keeping `owner` alive while the view lives.
fn dlpack(py: Python<'_>, ptr: u64, shape: &[usize], dtype: DlDataType, device: i32, owner: Py<PyAny>) -> PyResult<PyObject> {
    let mut ctx = Box::new(ViewCtx { shape: shape.iter().map(|&d| d as i64).collect(), _owner: owner });
    let m = Box::new(DlManagedTensor {
        dl_tensor: DlTensor {
            data: ptr as *mut c_void,
            device: DlDevice { device_type: DL_CUDA, device_id: device },
            ndim: shape.len() as i32,
            dtype,
            shape: ctx.shape.as_mut_ptr(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        },
        manager_ctx: std::ptr::null_mut(),
        deleter: Some(dl_deleter),
    });
    let m = Box::into_raw(m);
    // SAFETY: `m` is a live allocation; the context box moves into it and is freed by the deleter.
    unsafe { (*m).manager_ctx = Box::into_raw(ctx) as *mut c_void };
    // SAFETY: the capsule takes `m`; its destructor deletes it unless a consumer took it.
    let cap = unsafe { pyo3::ffi::PyCapsule_New(m as *mut c_void, DLTENSOR.as_ptr(), Some(capsule_destructor)) };
    if cap.is_null() {
        // SAFETY: the capsule was not made, so `m` is still ours.
        unsafe { dl_deleter(m) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `cap` is a new reference.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) }.unbind())
}

/// Number of CUDA devices (raises `NoDevice` without a driver).
#[pyfunction]
fn device_count() -> PyResult<usize> {
    moe_ep::device_count().map_err(py_err)
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
    m.add_class::<PyLlCombinePending>()?;
    m.add_class::<PyHighThroughput>()?;
    m.add_class::<PyHtLayout>()?;
    m.add_class::<PyHtHandle>()?;
    m.add_function(wrap_pyfunction!(device_count, m)?)?;
    m.add_function(wrap_pyfunction!(check_tensor_py, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_path, m)?)?;
    m.add_function(wrap_pyfunction!(_shim_layout_proven, m)?)?;
    m.add_function(wrap_pyfunction!(_share_gpu_env, m)?)?;
    Ok(())
}
