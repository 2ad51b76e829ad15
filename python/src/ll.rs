//! The low-latency buffer's binding.

use crate::clock;
use crate::errors::*;
use crate::group::{PyGroup, stream_of};
use crate::live::{Live, lock};
use crate::profile;
use crate::tensors::*;
use half::bf16;
use moe_ep::ll::{CombineArgs, CombineInput, CombineMode, DispatchArgs, Handle, LlBuffer, LlConfig, Payload, ScaleFormat, ScaleLayout};
use moe_ep::{DeviceArg, Group, TopkIdx};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The handle of one low-latency dispatch. Through `deep_ep_dispatch` it is also DeepEP's
/// handle, the sequence `(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
/// num_experts)` (`layout_range` is None), carrying its buffer.
#[pyclass(name = "LowLatencyHandle", module = "moe_ep._moe_ep")]
pub(crate) struct PyLlHandle {
    h: Handle,
    num_tokens: usize,
    fp8: bool,
    ue8m0: bool,
    column_major: bool,
    /// DeepEP's view: the buffer (`_ll`), `src_info`, and the buffer's shape.
    deep_ep: Option<DeepEpView>,
}

/// What a DeepEP handle holds besides moe-ep's.
struct DeepEpView {
    ll: Py<PyLowLatency>,
    src_info: PyObject,
    max_tokens: usize,
    hidden: usize,
    num_experts: usize,
}

#[pymethods]
impl PyLlHandle {
    /// What the received views depend on: `(half, fp8, ue8m0, column_major)`. Views of equal
    /// keys are the same memory, so the package makes them once per key.
    #[getter]
    fn view_key(&self) -> ViewKey {
        (self.h.half(), self.fp8, self.ue8m0, self.column_major)
    }

    /// The buffer of a DeepEP handle (None for moe-ep's own).
    #[getter]
    fn _ll(&self, py: Python<'_>) -> Option<Py<PyLowLatency>> {
        self.deep_ep.as_ref().map(|d| d.ll.clone_ref(py))
    }

    /// A handle is always true (moe-ep's own has no items).
    fn __bool__(&self) -> bool {
        true
    }

    fn __len__(&self) -> usize {
        if self.deep_ep.is_some() { 5 } else { 0 }
    }

    /// DeepEP's tuple items, by index or slice (as a tuple's).
    fn __getitem__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        self.items(py)?.bind(py).as_any().get_item(key).map(|v| v.unbind())
    }

    /// DeepEP's tuple items, in order (unpacking).
    fn __iter__(&self, py: Python<'_>) -> PyResult<PyObject> {
        Ok(self.items(py)?.bind(py).as_any().try_iter()?.into_any().unbind())
    }
}

impl PyLlHandle {
    /// The buffer and hidden size of a DeepEP handle (None for moe-ep's own).
    pub(crate) fn deep_ep_buffer(&self, py: Python<'_>) -> Option<(Py<PyLowLatency>, usize)> {
        self.deep_ep.as_ref().map(|d| (d.ll.clone_ref(py), d.hidden))
    }

    /// DeepEP's tuple: `(src_info, None, tokens per rank, hidden, experts)`.
    fn items(&self, py: Python<'_>) -> PyResult<Py<pyo3::types::PyTuple>> {
        let d = self.deep_ep.as_ref().ok_or_else(|| pyo3::exceptions::PyTypeError::new_err("a moe_ep low-latency handle is not a sequence"))?;
        let items = (d.src_info.clone_ref(py), py.None(), d.max_tokens, d.hidden, d.num_experts);
        Ok(items.into_pyobject(py)?.unbind())
    }
}

/// The torch views of one buffer half and format, made once by the package and handed out again
/// while the caller has not altered them (SGLang's `x.set_(empty)`, a `resize_`): `marks` holds
/// each tensor of `recv_x` with the data pointer and shape it had when made.
struct Views {
    recv_x: PyObject,
    count: PyObject,
    src_info: PyObject,
    marks: Vec<(PyObject, u64, Vec<usize>)>,
}

impl Views {
    fn intact(&self, py: Python<'_>) -> bool {
        self.marks.iter().all(|(t, ptr, shape)| {
            let t = t.bind(py);
            crate::torch_shim::same_place(t, *ptr, shape)
                .unwrap_or_else(|| tensor_info("recv_x", t).is_ok_and(|m| m.ptr == *ptr && m.shape[..] == shape[..]))
        })
    }
}

/// A hook-mode low-latency combine whose receive half has not run.
#[pyclass(name = "LowLatencyCombinePending", module = "moe_ep._moe_ep", frozen)]
pub(crate) struct PyLlCombinePending {
    pending: Mutex<Option<moe_ep::ll::CombinePending<'static>>>,
    /// The tensors the receive half reads and writes (`topk_idx`, `topk_weights`, `out`),
    /// kept alive by this object (see `combine`'s SAFETY comment).
    _tensors: Vec<Py<PyAny>>,
}

/// The low-latency buffer (decode): dispatch and combine on torch tensors. Usable from any
/// thread (calls are serialised by a lock; a hook may run on another thread than its call).
/// A call on a destroyed buffer is refused where it reaches the buffer, after its tensors are
/// checked (a bad tensor is named first).
#[pyclass(name = "LowLatencyBuffer", module = "moe_ep._moe_ep", frozen)]
pub(crate) struct PyLowLatency {
    g: Group,
    /// `None` once destroyed.
    buf: Mutex<Option<LlBuffer>>,
    /// The buffer's shape (read on every call without taking the lock).
    cfg: LlShape,
    /// CPU time ([`clock`] ticks) the last dispatch or combine spent in the Rust API (the
    /// launch), so the binding's own share of a call can be measured in the same process.
    last_api: AtomicU64,
    /// The same for the whole of the extension's function (from its first line to its last).
    last_ext: AtomicU64,
}

/// What a buffer was built for, which never changes (unlike its launch grid, which
/// `LlBuffer::set_launch` may change and is read from the buffer itself).
#[derive(Clone, Copy)]
struct LlShape {
    num_experts: usize,
    hidden: usize,
    max_topk: usize,
    max_tokens_per_rank: usize,
}

impl From<&LlConfig> for LlShape {
    fn from(c: &LlConfig) -> Self {
        LlShape { num_experts: c.num_experts, hidden: c.hidden, max_topk: c.max_topk, max_tokens_per_rank: c.max_tokens_per_rank }
    }
}

/// A dispatch's arguments besides its stream and tensors (see `PyLowLatency::dispatch`).
struct DispatchOptions<'a, 'py> {
    topk_weights: Option<&'a Bound<'py, PyAny>>,
    use_fp8: bool,
    scale_format: &'a str,
    column_major_scales: bool,
    hook: bool,
    stats: Option<&'a Bound<'py, PyAny>>,
}

/// The received views of one low-latency buffer, per `view_key` (`deep_ep_dispatch`). Held by
/// the package beside the buffer, not by the buffer: the views own a reference to the buffer
/// (their memory), which the buffer holding them would make a cycle.
#[pyclass(name = "LowLatencyViews", module = "moe_ep._moe_ep", frozen)]
pub(crate) struct PyLlViews {
    views: Mutex<Vec<(ViewKey, Arc<Views>)>>,
}

/// `PyLlHandle::view_key`: `(half, fp8, ue8m0, column_major)`.
type ViewKey = (usize, bool, bool, bool);

#[pymethods]
impl PyLlViews {
    #[new]
    fn new() -> Self {
        PyLlViews { views: Mutex::new(Vec::new()) }
    }
}

impl PyLlViews {
    /// `(recv_x, count, src_info)` for a handle of view key `key`: the views made before for its
    /// half and format, while intact (the caller has not altered them); else None (`make`).
    fn cached(&self, py: Python<'_>, key: ViewKey) -> Option<(PyObject, PyObject, PyObject)> {
        // Nothing that may run Python (the intact check's attribute path, a tensor's release)
        // runs under the lock: it may switch threads.
        let cached = lock(&self.views).iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
        let v = cached.filter(|v| v.intact(py))?;
        Some((v.recv_x.clone_ref(py), v.count.clone_ref(py), v.src_info.clone_ref(py)))
    }

    /// The views of `handle` made by `make(buffer, handle)` (a tensor or a pair of tensors, the
    /// count, `src_info`), kept for the next handle of its key.
    fn make(
        &self,
        ll: &Bound<'_, PyLowLatency>,
        handle: &Bound<'_, PyLlHandle>,
        make: &Bound<'_, PyAny>,
    ) -> PyResult<(PyObject, PyObject, PyObject)> {
        let py = ll.py();
        let key = handle.borrow().view_key();
        let (recv_x, count, src_info): (PyObject, PyObject, PyObject) = make.call1((ll, handle))?.extract()?;
        let parts: Vec<PyObject> = match recv_x.bind(py).downcast::<pyo3::types::PyTuple>() {
            Ok(t) => t.iter().map(|t| t.unbind()).collect(),
            Err(_) => vec![recv_x.clone_ref(py)],
        };
        let marks =
            parts.into_iter().map(|t| tensor_info("recv_x", t.bind(py)).map(|m| (t, m.ptr, m.shape.to_vec()))).collect::<PyResult<Vec<_>>>()?;
        let v = Arc::new(Views { recv_x: recv_x.clone_ref(py), count: count.clone_ref(py), src_info: src_info.clone_ref(py), marks });
        // The replaced views are released after the lock.
        let _old = {
            let mut views = lock(&self.views);
            let old = views.iter().position(|(k, _)| *k == key).map(|i| views.swap_remove(i));
            views.push((key, v));
            old
        };
        Ok((recv_x, count, src_info))
    }
}

impl PyLowLatency {
    /// The buffer, locked (the error of a destroyed one).
    fn buf(&self) -> PyResult<Live<'_, LlBuffer>> {
        Live::of(&self.buf)
    }

    fn set_api(&self, t0: u64) {
        self.last_api.store(clock::since(t0), Ordering::Relaxed);
    }

    fn set_ext(&self, t0: u64) {
        self.last_ext.store(clock::since(t0), Ordering::Relaxed);
    }

    /// The dispatch of checked tensors (`xi`, `ti`: `x` and `topk_idx`).
    fn launch_dispatch(&self, stream: usize, xi: &TensorInfo, ti: &TensorInfo, o: DispatchOptions<'_, '_>) -> PyResult<PyLlHandle> {
        let DispatchOptions { topk_weights, use_fp8, scale_format, column_major_scales, hook, stats } = o;
        let dev = self.g.device() as i64;
        let (n, k) = (xi.shape[0], ti.shape[1]);
        let wi = topk_weights.map(|w| check("topk_weights", w, &["torch.float32"], &[Some(n), Some(k)], dev)).transpose()?;
        let fmt = match scale_format {
            "f32" => ScaleFormat::F32,
            "f32_pow2" => ScaleFormat::F32Pow2,
            "ue8m0" => ScaleFormat::Ue8m0,
            other => return Err(invalid("scale_format", format!("{other:?} is not one of \"f32\", \"f32_pow2\", \"ue8m0\""))),
        };
        // Checks run before the buffer is locked (a tensor's attributes may run Python, which
        // may switch to a thread that calls this buffer).
        let epr = self.cfg.num_experts / self.g.world();
        let si = stats.map(|st| check("cumulative_local_expert_recv_stats", st, &["torch.int32"], &[Some(epr)], dev)).transpose()?;
        let mut buf = self.buf()?;
        let (xr, tr) = (Raw::<bf16>::of(xi), Raw::<i64>::of(ti));
        let wr = wi.as_ref().map(Raw::<f32>::of);
        let sr = si.as_ref().map(Raw::<i32>::of);
        let args = DispatchArgs {
            topk_weights: wr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
            stats: sr.as_ref().map(|st| st as &dyn DeviceArg<i32>),
            payload: if use_fp8 { Payload::Fp8(fmt) } else { Payload::Bf16 },
            scale_layout: if column_major_scales { ScaleLayout::ColumnMajor } else { ScaleLayout::RowMajor },
            hook,
            ..DispatchArgs::fp8(&xr, TopkIdx::I64(&tr))
        };
        let s = stream_of(&self.g, stream);
        profile::mark("launch arguments");
        let t0 = clock::ticks();
        let r = buf.dispatch(&s, &args);
        self.set_api(t0);
        // The error becomes a Python exception after the lock (making one may run Python).
        drop(buf);
        let (h, _) = r.map_err(py_err)?;
        profile::mark("Rust API");
        Ok(PyLlHandle {
            h,
            num_tokens: n,
            fp8: use_fp8,
            ue8m0: use_fp8 && fmt == ScaleFormat::Ue8m0,
            column_major: column_major_scales,
            deep_ep: None,
        })
    }
}

#[pymethods]
impl PyLowLatency {
    /// Collective: releases the buffer on every rank (DeepEP's `destroy`); the GIL is released
    /// while it waits. Dropping it instead runs no collective (its memory is kept until every
    /// rank has dropped it).
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        let buf = lock(&self.buf).take().ok_or_else(destroyed)?;
        py.allow_threads(|| buf.destroy()).map_err(py_err)
    }

    /// `LowLatencyBuffer(group, num_experts, hidden, max_topk, max_tokens_per_rank,
    /// transport="ipc")`: collective (the GIL is released while the ranks meet). `transport`:
    /// "ipc" (moe-ep's own heap, the default inside a node) or "nvshmem" (the buffer in NVSHMEM's
    /// symmetric memory, NVSHMEM set up on this group the first time; every rank must be
    /// reachable directly for now).
    #[new]
    #[pyo3(signature = (group, num_experts, hidden, max_topk, max_tokens_per_rank, transport = "ipc"))]
    fn new(
        py: Python<'_>,
        group: &PyGroup,
        num_experts: usize,
        hidden: usize,
        max_topk: usize,
        max_tokens_per_rank: usize,
        transport: &str,
    ) -> PyResult<Self> {
        let cfg = LlConfig::new(num_experts, hidden, max_topk, max_tokens_per_rank);
        let g = &group.g;
        if !matches!(transport, "ipc" | "nvshmem") {
            return Err(invalid("transport", format!("{transport:?} is not \"ipc\" or \"nvshmem\"")));
        }
        let buf = py
            .allow_threads(|| {
                // Every rank must build on the same transport (a mismatch is an error everywhere).
                g.agree("low-latency transport", transport)?;
                match transport {
                    "nvshmem" => crate::nvshmem::for_group(g).and_then(|nv| LlBuffer::with_nvshmem(g, &nv, cfg)),
                    _ => LlBuffer::new(g, cfg),
                }
            })
            .map_err(py_err)?;
        let cfg = LlShape::from(buf.config());
        Ok(PyLowLatency { g: g.clone(), buf: Mutex::new(Some(buf)), cfg, last_api: AtomicU64::new(0), last_ext: AtomicU64::new(0) })
    }

    /// Dispatch of `x` (`bf16 [N, hidden]`) by `topk_idx` (`int64 [N, k]`); `topk_weights`
    /// (`float32 [N, k]`) travel with the rows (needed for the pre-reduced combine).
    /// `scale_format`: "f32", "f32_pow2" or "ue8m0" (FP8 only).
    /// `stats` (`int32 [E_local]`): the received rows per local expert are added to it
    /// (DeepEP's `cumulative_local_expert_recv_stats`).
    #[pyo3(signature = (stream, x, topk_idx, topk_weights = None, use_fp8 = true, scale_format = "f32", column_major_scales = false, hook = false, stats = None))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        stream: usize,
        x: &Bound<'_, PyAny>,
        topk_idx: &Bound<'_, PyAny>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        use_fp8: bool,
        scale_format: &str,
        column_major_scales: bool,
        hook: bool,
        stats: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyLlHandle> {
        let t_in = clock::ticks();
        let dev = self.g.device() as i64;
        let hd = self.cfg.hidden;
        let xi = check("x", x, &["torch.bfloat16"], &[None, Some(hd)], dev)?;
        let ti = check("topk_idx", topk_idx, &["torch.int64"], &[Some(xi.shape[0]), None], dev)?;
        let o = DispatchOptions { topk_weights, use_fp8, scale_format, column_major_scales, hook, stats };
        let h = self.launch_dispatch(stream, &xi, &ti, o)?;
        self.set_ext(t_in);
        Ok(h)
    }

    /// DeepEP's low-latency dispatch in one call (`moe_ep.deep_ep`): `None` when this buffer was
    /// built for another shape (`tokens` per rank, `num_experts`, `x`'s hidden size, or fewer
    /// top-k slots than `topk_idx` has: the caller builds one that fits), else `(recv_x, count,
    /// handle)` with the handle DeepEP's sequence. The views come from `make_views(buffer,
    /// handle) -> (recv_x, count, src_info)` the first time for each half and format (and
    /// whenever the caller altered them), then from `views`.
    #[pyo3(signature = (stream, x, topk_idx, tokens, num_experts, use_fp8, scale_format, hook, stats, views, make_views))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn deep_ep_dispatch(
        slf: &Bound<'_, Self>,
        stream: usize,
        x: &Bound<'_, PyAny>,
        topk_idx: &Bound<'_, PyAny>,
        tokens: usize,
        num_experts: usize,
        use_fp8: bool,
        scale_format: &str,
        hook: bool,
        stats: Option<&Bound<'_, PyAny>>,
        views: &PyLlViews,
        make_views: &Bound<'_, PyAny>,
    ) -> PyResult<Option<(PyObject, PyObject, Py<PyLlHandle>)>> {
        let t_in = clock::ticks();
        let me = slf.get();
        let dev = me.g.device() as i64;
        let cfg = me.cfg;
        let xi = check("x", x, &["torch.bfloat16"], &[None, None], dev)?;
        let ti = check("topk_idx", topk_idx, &["torch.int64"], &[Some(xi.shape[0]), None], dev)?;
        if cfg.max_tokens_per_rank != tokens || cfg.num_experts != num_experts || cfg.hidden != xi.shape[1] || cfg.max_topk < ti.shape[1] {
            return Ok(None);
        }
        profile::mark("tensor checks");
        // DeepEP's scales are column-major; in hook mode its receive hook counts the rows.
        let o =
            DispatchOptions { topk_weights: None, use_fp8, scale_format, column_major_scales: true, hook, stats: if hook { None } else { stats } };
        let mut h = me.launch_dispatch(stream, &xi, &ti, o)?;
        let py = slf.py();
        let view = |src_info| DeepEpView { ll: slf.clone().unbind(), src_info, max_tokens: tokens, hidden: cfg.hidden, num_experts };
        // The views made before for this half and format, while intact; else the handle is made
        // first (the package makes the views from it) and given its `src_info` after.
        let out = match views.cached(py, h.view_key()) {
            Some((recv_x, count, src_info)) => {
                h.deep_ep = Some(view(src_info));
                (recv_x, count, Py::new(py, h)?)
            }
            None => {
                h.deep_ep = Some(view(py.None()));
                let handle = Bound::new(py, h)?;
                let (recv_x, count, src_info) = views.make(slf, &handle, make_views)?;
                if let Some(d) = handle.borrow_mut().deep_ep.as_mut() {
                    d.src_info = src_info;
                }
                (recv_x, count, handle.unbind())
            }
        };
        profile::mark("handle, views");
        me.set_ext(t_in);
        Ok(Some(out))
    }

    /// The receive half of a hook-mode dispatch (`stats` as in `dispatch`: the receive half
    /// counts the rows).
    #[pyo3(signature = (stream, handle, stats = None))]
    pub(crate) fn dispatch_recv(&self, stream: usize, handle: &mut PyLlHandle, stats: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let epr = self.cfg.num_experts / self.g.world();
        let si =
            stats.map(|st| check("cumulative_local_expert_recv_stats", st, &["torch.int32"], &[Some(epr)], self.g.device() as i64)).transpose()?;
        let sr = si.as_ref().map(Raw::<i32>::of);
        let s = stream_of(&self.g, stream);
        let r = self.buf()?.dispatch_recv(&s, &mut handle.h, sr.as_ref().map(|st| st as &dyn DeviceArg<i32>));
        r.map(|_| ()).map_err(py_err)
    }

    /// Finishes hook-mode calls whose hooks were dropped without being called (see
    /// `LlBuffer::recover_pending_hooks`): `(dispatch finished, combine drained)`.
    fn recover_pending_hooks(&self, stream: usize) -> PyResult<(bool, bool)> {
        let s = stream_of(&self.g, stream);
        let r = self.buf()?.recover_pending_hooks(&s);
        r.map_err(py_err)
    }

    /// DLPack capsules viewing what `handle` received: `(x, scales or None, count, src_info)`.
    /// `x` is `[E_local, R * T, hidden]` (uint8 bytes of FP8 e4m3, or bf16); scales `float32
    /// [E_local, R * T, hidden / 128]` (row-major), `[E_local, hidden / 128, rows]` (column-major)
    /// or int32 words of four UE8M0 bytes; `count` int32 `[E_local]`; `src_info` int32.
    /// The views stay valid until the dispatch after next (two halves).
    fn recv_views(slf: &Bound<'_, Self>, handle: &PyLlHandle) -> PyResult<(PyObject, Option<PyObject>, PyObject, PyObject)> {
        let py = slf.py();
        let me = slf.borrow();
        let (h, dev) = (&handle.h, me.g.device() as i32);
        let (epr, rows, hd) = (me.cfg.num_experts / me.g.world(), me.g.world() * me.cfg.max_tokens_per_rank, me.cfg.hidden);
        // The addresses under the lock; errors become Python exceptions and capsules are made
        // after it (either may run Python).
        let (x, scales, count, src, scale_rows) = {
            let b = me.buf()?;
            let x = if handle.fp8 { b.recv_x_fp8(h).map(|v| v.device_addr()) } else { b.recv_x_bf16(h).map(|v| v.device_addr()) };
            let scales = match (handle.fp8, handle.ue8m0) {
                (false, _) => None,
                (true, true) => Some(b.recv_scales_ue8m0(h).map(|v| v.device_addr())),
                (true, false) => Some(b.recv_scales(h).map(|v| v.device_addr())),
            };
            (x, scales, b.recv_count(h).map(|v| v.device_addr()), b.recv_src_info(h).map(|v| v.device_addr()), b.scale_rows())
        };
        let owner: Py<PyAny> = slf.clone().into_any().unbind();
        let groups = hd / 128;
        let x = dlpack(py, x.map_err(py_err)?, &[epr, rows, hd], if handle.fp8 { DT_U8 } else { DT_BF16 }, dev, owner.clone_ref(py))?;
        let scales = match scales {
            None => None,
            Some(addr) => {
                let (width, dt) = if handle.ue8m0 { (groups.div_ceil(4), DT_I32) } else { (groups, DT_F32) };
                let shape = if handle.column_major { [epr, width, scale_rows] } else { [epr, rows, width] };
                Some(dlpack(py, addr.map_err(py_err)?, &shape, dt, dev, owner.clone_ref(py))?)
            }
        };
        let count = dlpack(py, count.map_err(py_err)?, &[epr], DT_I32, dev, owner.clone_ref(py))?;
        let src = dlpack(py, src.map_err(py_err)?, &[epr, rows], DT_I32, dev, owner)?;
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
    pub(crate) fn combine(
        &self,
        stream: usize,
        handle: &PyLlHandle,
        x: Option<&Bound<'_, PyAny>>,
        topk_idx: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        pre_reduced: bool,
        hook: bool,
    ) -> PyResult<Option<PyLlCombinePending>> {
        let t_in = clock::ticks();
        let dev = self.g.device() as i64;
        let cfg = self.cfg;
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
        profile::mark("tensor checks, launch arguments");
        let t0 = clock::ticks();
        let r = self.buf()?.combine(&s, &handle.h, &args);
        self.set_api(t0);
        let (pending, _) = r.map_err(py_err)?;
        profile::mark("Rust API");
        let pending = pending.map(|p| {
            let tensors = [Some(topk_idx), Some(out), topk_weights].into_iter().flatten().map(|t| t.clone().unbind()).collect();
            // SAFETY: the pending half holds `topk_idx`, `topk_weights` and `out` (torch
            // tensors, which own their memory), so they stay allocated until `combine_recv` has
            // queued the receive half on `stream` and the pending object is dropped; torch's
            // caching allocator orders their later reuse on that same stream (the package runs
            // the hook on the combine's stream) after the receive half.
            PyLlCombinePending { pending: Mutex::new(Some(unsafe { p.into_unbound() })), _tensors: tensors }
        });
        self.set_ext(t_in);
        Ok(pending)
    }

    /// CPU microseconds the last `dispatch` or `combine` spent inside the Rust API (checks of
    /// sizes, the parameter block, the launch, the completion event): the rest of a call's
    /// time is the binding's.
    #[getter]
    fn last_api_us(&self, py: Python<'_>) -> f64 {
        clock::micros(py, self.last_api.load(Ordering::Relaxed))
    }

    /// The group's rank count.
    #[getter]
    fn world(&self) -> usize {
        self.g.world()
    }

    /// Ranks this buffer's kernels reach through NVSHMEM calls, in rank order: those NVSHMEM
    /// does not map, or every other rank with `MOE_EP_NVSHMEM_PUT=all`; none on moe-ep's own
    /// heap, or where every rank is reached by direct stores.
    #[getter]
    fn put_ranks(&self) -> PyResult<Vec<usize>> {
        Ok(self.buf()?.put_ranks().to_vec())
    }

    /// CPU microseconds the last `dispatch`, `deep_ep_dispatch` or `combine` spent in the
    /// extension's function, from its first line to its last (the rest of the extension's share
    /// is the Python-C boundary: argument parsing, the result object).
    #[getter]
    fn last_ext_us(&self, py: Python<'_>) -> f64 {
        clock::micros(py, self.last_ext.load(Ordering::Relaxed))
    }

    /// The receive half of a hook-mode combine (once per pending combine).
    pub(crate) fn combine_recv(&self, stream: usize, pending: &PyLlCombinePending) -> PyResult<()> {
        let mut slot = lock(&pending.pending);
        let p = slot.as_mut().ok_or_else(|| invalid("hook", "this combine's receive half has already run".into()))?;
        let s = stream_of(&self.g, stream);
        // A refused call leaves the pending half in place, to run on its own buffer.
        let r = self.buf()?.combine_recv(&s, p);
        r.map_err(py_err)?;
        *slot = None;
        Ok(())
    }

    /// A DLPack capsule of the zero-copy combine input of `handle` (`bf16 [E_local, R * T,
    /// hidden]`): write the expert outputs there and combine with `x=None`.
    fn combine_input(slf: &Bound<'_, Self>, handle: &PyLlHandle) -> PyResult<PyObject> {
        let py = slf.py();
        let me = slf.borrow();
        let cfg = me.cfg;
        let shape = [cfg.num_experts / me.g.world(), me.g.world() * cfg.max_tokens_per_rank, cfg.hidden];
        let addr = me.buf()?.combine_input(&handle.h).map(|v| v.device_addr());
        let addr = addr.map_err(py_err)?;
        dlpack(py, addr, &shape, DT_BF16, me.g.device() as i32, slf.clone().into_any().unbind())
    }
}
