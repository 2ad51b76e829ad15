//! DeepEP's low-latency calls in one extension call each: the base class of
//! `moe_ep.deep_ep.Buffer` ([`PyDeepEpBase`]) implements `low_latency_dispatch` and
//! `low_latency_combine` with DeepEP's signatures, and [`PyEventOverlap`] is DeepEP's
//! `EventOverlap`. Nothing of the package's Python runs on the way from the engine's call to the
//! launch: a decode step's per-call cost is the extension's alone (`python/examples/overhead.py`).
//! The Python subclass keeps what runs once (building the low-latency part, under its lock) and
//! the high-throughput calls.

use crate::errors::*;
use crate::live::lock;
use crate::ll::{PyLlCombinePending, PyLlHandle, PyLlViews, PyLowLatency};
use crate::profile;
use crate::tensors::check;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Mutex;

/// The low-latency part of a DeepEP buffer: `(buffer, key, views)` as the package sets it
/// (`_ll_state`), all None before the first call and after `destroy`.
struct LlState {
    ll: Option<Py<PyLowLatency>>,
    key: PyObject,
    views: Option<Py<PyLlViews>>,
}

/// What the base class reads on every call, set once by the subclass's constructor
/// (`_init_fast`).
struct Fast {
    /// `f(device) -> int`: torch's current raw stream of the device.
    raw_stream: PyObject,
    device: PyObject,
    device_index: i64,
    /// `f(buffer, handle) -> (recv_x, count, src_info)`: the received views (`PyLlViews::get`).
    make_views: PyObject,
    /// The `EventOverlap` of every call without `async_finish` (no event, nothing kept): one
    /// object, not one per call (making one costs about 0.25 us).
    no_event: Py<PyEventOverlap>,
}

/// The base of `moe_ep.deep_ep.Buffer`: DeepEP's two low-latency calls, in Rust.
#[pyclass(name = "DeepEpBufferBase", module = "moe_ep._moe_ep", subclass, frozen)]
pub(crate) struct PyDeepEpBase {
    state: Mutex<LlState>,
    fast: std::sync::OnceLock<Fast>,
}

/// What a DeepEP hook runs: the receive half of one low-latency dispatch or combine, on the
/// stream of its call.
enum HookWork {
    Dispatch { handle: Py<PyLlHandle>, stats: Option<PyObject> },
    Combine { pending: Py<PyLlCombinePending> },
}

/// DeepEP's receive hook (`return_recv_hook=True`): calling it queues the receive half.
#[pyclass(name = "LowLatencyRecvHook", module = "moe_ep._moe_ep", frozen)]
pub(crate) struct PyLlHook {
    ll: Py<PyLowLatency>,
    stream: usize,
    work: HookWork,
}

#[pymethods]
impl PyLlHook {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let ll = self.ll.get();
        match &self.work {
            HookWork::Dispatch { handle, stats } => {
                let mut h = handle.bind(py).try_borrow_mut()?;
                ll.dispatch_recv(self.stream, &mut h, stats.as_ref().map(|s| s.bind(py)))
            }
            HookWork::Combine { pending } => ll.combine_recv(self.stream, pending.get()),
        }
    }
}

/// DeepEP's `EventOverlap`: a CUDA event after an operation (`event` is None when the caller's
/// stream already waits for it), and the tensors to keep alive until it is waited for.
#[pyclass(name = "EventOverlap", module = "moe_ep.deep_ep", subclass)]
pub(crate) struct PyEventOverlap {
    #[pyo3(get, set)]
    event: PyObject,
    #[pyo3(get, set)]
    extra_tensors: PyObject,
}

#[pymethods]
impl PyEventOverlap {
    #[new]
    #[pyo3(signature = (event = None, extra_tensors = None))]
    fn new(py: Python<'_>, event: Option<PyObject>, extra_tensors: Option<PyObject>) -> Self {
        PyEventOverlap { event: event.unwrap_or_else(|| py.None()), extra_tensors: extra_tensors.unwrap_or_else(|| py.None()) }
    }

    /// Makes the current stream wait for the operation.
    fn current_stream_wait(&self, py: Python<'_>) -> PyResult<()> {
        if self.event.is_none(py) {
            return Ok(());
        }
        let stream = py.import("torch.cuda")?.call_method0("current_stream")?;
        stream.call_method1("wait_event", (self.event.bind(py),))?;
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.current_stream_wait(py)?;
        Ok(false)
    }
}

/// `NotImplementedError` naming a DeepEP argument moe-ep does not implement (as the package's
/// `_unsupported`).
fn unsupported(argument: &str, why: &str) -> PyErr {
    pyo3::exceptions::PyNotImplementedError::new_err(format!("moe_ep.deep_ep: `{argument}` is not supported: {why}"))
}

/// A `MoeEpError` of a misuse of the base class itself.
fn internal(msg: &str) -> PyErr {
    with_fields(MoeEpError::new_err(msg.to_string()), "Internal", None, None, None, None)
}

impl Fast {
    /// torch's current raw stream of the buffer's device (torch's C shim, else `raw_stream`).
    fn stream(&self, py: Python<'_>) -> PyResult<usize> {
        crate::torch_shim::current_stream(py, self.device_index as i32, || self.raw_stream.bind(py).call1((self.device.bind(py),))?.extract())
    }
}

impl PyDeepEpBase {
    fn fast(&self) -> PyResult<&Fast> {
        self.fast.get().ok_or_else(|| internal("moe_ep.deep_ep: Buffer.__init__ did not run"))
    }

    /// The low-latency buffer and its views, when built.
    fn ll(&self, py: Python<'_>) -> Option<(Py<PyLowLatency>, Py<PyLlViews>)> {
        let s = lock(&self.state);
        Some((s.ll.as_ref()?.clone_ref(py), s.views.as_ref()?.clone_ref(py)))
    }

    /// DeepEP's `EventOverlap` of a call: with `async_finish`, an event recorded on the current
    /// stream (the subclass's `capture`) holding `keep`; else the buffer's one empty object.
    fn event<'py>(slf: &Bound<'py, Self>, async_finish: bool, keep: impl FnOnce() -> PyResult<Bound<'py, PyTuple>>) -> PyResult<PyObject> {
        let py = slf.py();
        if !async_finish {
            return Ok(slf.get().fast()?.no_event.clone_ref(py).into_any());
        }
        let e = slf.call_method0("capture")?;
        e.setattr("extra_tensors", keep()?)?;
        Ok(e.unbind())
    }
}

#[pymethods]
impl PyDeepEpBase {
    /// Takes any arguments: the subclass's `__init__` reads them.
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(py: Python<'_>, _args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        PyDeepEpBase { state: Mutex::new(LlState { ll: None, key: py.None(), views: None }), fast: std::sync::OnceLock::new() }
    }

    /// Set once by the subclass's constructor: `raw_stream(device) -> int` (torch's current raw
    /// stream), the device, and `make_views(buffer, handle)` (the received views).
    fn _init_fast(&self, raw_stream: PyObject, device: &Bound<'_, PyAny>, make_views: PyObject) -> PyResult<()> {
        let device_index = device.extract::<i64>()?;
        let py = device.py();
        let no_event = Py::new(py, PyEventOverlap::new(py, None, None))?;
        let f = Fast { raw_stream, device: device.clone().unbind(), device_index, make_views, no_event };
        self.fast.set(f).map_err(|_| internal("moe_ep.deep_ep: Buffer._init_fast runs once"))
    }

    /// `(buffer, key, views)` of the low-latency part (all None when there is none).
    #[getter]
    fn _ll_state(&self, py: Python<'_>) -> (Option<Py<PyLowLatency>>, PyObject, Option<Py<PyLlViews>>) {
        let s = lock(&self.state);
        (s.ll.as_ref().map(|l| l.clone_ref(py)), s.key.clone_ref(py), s.views.as_ref().map(|v| v.clone_ref(py)))
    }

    #[setter(_ll_state)]
    fn set_ll_state(&self, v: (Option<Py<PyLowLatency>>, PyObject, Option<Py<PyLlViews>>)) {
        let (ll, key, views) = v;
        // The old state is released after the lock (releasing runs no Python under it).
        let _old = std::mem::replace(&mut *lock(&self.state), LlState { ll, key, views });
    }

    /// DeepEP's low-latency dispatch: `(recv_x, recv_count, handle, event, hook)`. `recv_x` is
    /// bf16 `[E_local, R * T, H]`, or with `use_fp8` a pair of FP8 rows and column-major scales
    /// (float32 `[E_local, R * T, H / 128]`, int32-packed UE8M0 with `use_ue8m0`). Views of one
    /// of the buffer's two halves, valid until the dispatch after next (as DeepEP's): the same
    /// tensor objects every other call while the caller leaves them as they are, new ones after
    /// it altered them. The first call for a shape builds the low-latency part (collective).
    #[pyo3(signature = (
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats = None,
        dispatch_wait_recv_cost_stats = None, use_fp8 = true, round_scale = false, use_ue8m0 = false, async_finish = false,
        return_recv_hook = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn low_latency_dispatch(
        slf: &Bound<'_, Self>,
        x: &Bound<'_, PyAny>,
        topk_idx: &Bound<'_, PyAny>,
        num_max_dispatch_tokens_per_rank: usize,
        num_experts: usize,
        cumulative_local_expert_recv_stats: Option<&Bound<'_, PyAny>>,
        dispatch_wait_recv_cost_stats: Option<&Bound<'_, PyAny>>,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
    ) -> PyResult<(PyObject, PyObject, Py<PyLlHandle>, PyObject, PyObject)> {
        if dispatch_wait_recv_cost_stats.is_some() {
            return Err(unsupported("dispatch_wait_recv_cost_stats", "the wait-cost statistics are not implemented"));
        }
        profile::begin();
        let py = slf.py();
        let me = slf.get();
        let fast = me.fast()?;
        let fmt = if use_ue8m0 {
            "ue8m0"
        } else if round_scale {
            "f32_pow2"
        } else {
            "f32"
        };
        let stream = fast.stream(py)?;
        profile::mark("stream lookup");
        let stats = cumulative_local_expert_recv_stats;
        let tokens = num_max_dispatch_tokens_per_rank;
        let make = fast.make_views.bind(py);
        let go = |ll: &Py<PyLowLatency>, views: &Py<PyLlViews>| {
            PyLowLatency::deep_ep_dispatch(
                ll.bind(py),
                stream,
                x,
                topk_idx,
                tokens,
                num_experts,
                use_fp8,
                fmt,
                return_recv_hook,
                stats,
                views.get(),
                make,
            )
        };
        let built = me.ll(py);
        let mut r = match &built {
            Some((ll, views)) => go(ll, views)?.map(|r| (ll.clone_ref(py), r)),
            None => None,
        };
        if r.is_none() {
            // The first call for this shape: the package builds the part (collective, under its
            // lock) from the checked shapes, then the dispatch runs on what it built.
            let xi = check("x", x, &["torch.bfloat16"], &[None, None], fast.device_index)?;
            let ti = check("topk_idx", topk_idx, &["torch.int64"], &[Some(xi.shape[0]), None], fast.device_index)?;
            let (ll, views): (Py<PyLowLatency>, Py<PyLlViews>) =
                slf.call_method1("_ll_for", (tokens, xi.shape[1], num_experts, ti.shape[1]))?.extract()?;
            let out = go(&ll, &views)?.ok_or_else(|| internal("moe_ep.deep_ep: the low-latency part was rebuilt during the call"))?;
            r = Some((ll, out));
        }
        let (ll, (recv_x, count, handle)) = r.expect("set above");
        let hook = if return_recv_hook {
            let work = HookWork::Dispatch { handle: handle.clone_ref(py), stats: stats.map(|s| s.clone().unbind()) };
            Py::new(py, PyLlHook { ll, stream, work })?.into_any()
        } else {
            py.None()
        };
        let keep = || PyTuple::new(py, [x.clone(), topk_idx.clone(), stats.cloned().unwrap_or_else(|| py.None().into_bound(py))]);
        let event = Self::event(slf, async_finish, keep)?;
        profile::mark("hook, event");
        Ok((recv_x, count, handle, event, hook))
    }

    /// DeepEP's low-latency combine (per expert, exact): `(combined_x, event, hook)`;
    /// `combined_x` is `out` or a new bf16 `[N, H]` tensor (written by the hook in hook mode).
    #[pyo3(signature = (
        x, topk_idx, topk_weights, handle, use_logfmt = false, zero_copy = false, async_finish = false,
        return_recv_hook = false, out = None, combine_wait_recv_cost_stats = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn low_latency_combine(
        slf: &Bound<'_, Self>,
        x: &Bound<'_, PyAny>,
        topk_idx: &Bound<'_, PyAny>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        handle: &Bound<'_, PyAny>,
        use_logfmt: bool,
        zero_copy: bool,
        async_finish: bool,
        return_recv_hook: bool,
        out: Option<&Bound<'_, PyAny>>,
        combine_wait_recv_cost_stats: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(PyObject, PyObject, PyObject)> {
        if use_logfmt {
            return Err(unsupported("use_logfmt", "LogFMT is not implemented (bf16 combine)"));
        }
        if combine_wait_recv_cost_stats.is_some() {
            return Err(unsupported("combine_wait_recv_cost_stats", "the wait-cost statistics are not implemented"));
        }
        profile::begin();
        let py = slf.py();
        let fast = slf.get().fast()?;
        let not_ours = || invalid("handle", "not a handle of a moe_ep.deep_ep low_latency_dispatch".into());
        let h = handle.downcast::<PyLlHandle>().map_err(|_| not_ours())?;
        let (ll, hidden) = h.borrow().deep_ep_buffer(py).ok_or_else(not_ours)?;
        let out = match out {
            Some(o) => o.clone(),
            None => {
                let n = check("topk_idx", topk_idx, &["torch.int64"], &[None, None], fast.device_index)?.shape[0];
                let torch = py.import("torch")?;
                let kw = PyDict::new(py);
                kw.set_item("dtype", torch.getattr("bfloat16")?)?;
                kw.set_item("device", topk_idx.getattr("device")?)?;
                torch.call_method("empty", ((n, hidden),), Some(&kw))?
            }
        };
        let stream = fast.stream(py)?;
        profile::mark("handle, out, stream lookup");
        let pending =
            ll.get().combine(stream, &h.borrow(), if zero_copy { None } else { Some(x) }, topk_idx, &out, topk_weights, false, return_recv_hook)?;
        let hook = match pending {
            Some(p) => Py::new(py, PyLlHook { ll, stream, work: HookWork::Combine { pending: Py::new(py, p)? } })?.into_any(),
            None => py.None(),
        };
        let none = || py.None().into_bound(py);
        let keep = || PyTuple::new(py, [x.clone(), topk_idx.clone(), topk_weights.cloned().unwrap_or_else(none), out.clone()]);
        let event = Self::event(slf, async_finish, keep)?;
        profile::mark("hook, event");
        Ok((out.unbind(), event, hook))
    }

    /// A method of `low_latency_dispatch`'s signature and result shape that does nothing: what
    /// the call itself costs (its arguments, its result), measured by `overhead.py` beside the
    /// real one.
    #[pyo3(signature = (
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats = None,
        dispatch_wait_recv_cost_stats = None, use_fp8 = true, round_scale = false, use_ue8m0 = false, async_finish = false,
        return_recv_hook = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn _call_cost_probe(
        slf: &Bound<'_, Self>,
        x: &Bound<'_, PyAny>,
        topk_idx: &Bound<'_, PyAny>,
        num_max_dispatch_tokens_per_rank: usize,
        num_experts: usize,
        cumulative_local_expert_recv_stats: Option<&Bound<'_, PyAny>>,
        dispatch_wait_recv_cost_stats: Option<&Bound<'_, PyAny>>,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
    ) -> PyResult<(PyObject, PyObject, PyObject, PyObject, PyObject)> {
        let _ = (
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
        );
        let py = slf.py();
        Ok((py.None(), py.None(), py.None(), py.None(), py.None()))
    }
}
