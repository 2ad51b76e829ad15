//! The high-throughput buffer's binding.

use crate::errors::*;
use crate::group::{PyGroup, stream_of};
use crate::live::{Live, lock};
use crate::tensors::*;
use half::bf16;
use moe_ep::ht::{self, HtBuffer, HtConfig, Layout};
use moe_ep::{DeviceArg, Group, TopkIdx};
use pyo3::prelude::*;
use std::sync::Mutex;

/// The routing of one high-throughput dispatch (`HighThroughputBuffer.layout`).
#[pyclass(name = "HighThroughputLayout", module = "moe_ep._moe_ep")]
pub(crate) struct PyHtLayout {
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
#[pyclass(name = "HighThroughputHandle", module = "moe_ep._moe_ep")]
pub(crate) struct PyHtHandle {
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
    /// A DLPack capsule of `int32 [R + 1]`: the first received row of each source rank (the
    /// last entry is the row count), valid while this handle lives (written by its dispatch).
    fn src_base(slf: &Bound<'_, Self>, device: i32) -> PyResult<PyObject> {
        let me = slf.borrow();
        let v = me.h.src_base_device();
        dlpack(slf.py(), v.device_addr(), &[v.elems()], DT_I32, device, slf.clone().into_any().unbind())
    }
}

/// The high-throughput buffer (prefill): layout, dispatch, cached dispatch and combine on
/// torch tensors. Usable from any thread (calls are serialised by a lock).
#[pyclass(name = "HighThroughputBuffer", module = "moe_ep._moe_ep")]
pub(crate) struct PyHighThroughput {
    g: Group,
    /// `None` once destroyed.
    buf: Mutex<Option<HtBuffer>>,
}

impl PyHighThroughput {
    /// The buffer, locked (the error of a destroyed one).
    fn buf(&self) -> PyResult<Live<'_, HtBuffer>> {
        Live::of(&self.buf)
    }
}

#[pymethods]
impl PyHighThroughput {
    /// Collective: releases the buffer on every rank; as `LowLatencyBuffer.destroy`.
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        let buf = lock(&self.buf).take().ok_or_else(destroyed)?;
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
        Ok(PyHighThroughput { g: group.g.clone(), buf: Mutex::new(Some(buf)) })
    }

    /// Blocks (SMs) of the dispatch and combine kernels.
    #[getter]
    fn num_sms(&self) -> PyResult<u32> {
        Ok(self.buf()?.config().num_sms)
    }

    /// Collective: the dispatch and combine kernels' blocks (every rank passes the same).
    fn set_num_sms(&self, num_sms: u32) -> PyResult<()> {
        let r = {
            let mut b = self.buf()?;
            let threads = b.config().threads;
            b.set_launch(num_sms, threads)
        };
        // The error becomes a Python exception after the lock (making one may run Python).
        r.map_err(py_err)
    }

    /// The routing of `topk_idx` (`int64 [N, k]`, -1 = no expert): counts per rank and
    /// expert, and which ranks each token goes to.
    fn layout(&self, stream: usize, topk_idx: &Bound<'_, PyAny>) -> PyResult<PyHtLayout> {
        let ti = check("topk_idx", topk_idx, &["torch.int64"], &[None, None], self.g.device() as i64)?;
        let tr = Raw::<i64>::of(&ti);
        let s = stream_of(&self.g, stream);
        let (layout, experts) = {
            let buf = self.buf()?;
            (buf.layout(&s, TopkIdx::I64(&tr), ti.shape[1]), buf.config().num_experts)
        };
        Ok(PyHtLayout { layout: layout.map_err(py_err)?, device: self.g.device() as i32, world: self.g.world(), experts })
    }

    /// Dispatch of `x` (`bf16 [N, hidden]`, or FP8 `float8_e4m3fn [N, hidden]` with `x_scales`
    /// `float32 [N, hidden / 128]`) by `layout`, with `topk_idx` and `topk_weights` travelling
    /// along. With `handle` (an earlier dispatch of the same layout) it is a cached dispatch: no
    /// count exchange. With `wait_for_counts` (the default) the host waits for the counts, so
    /// the views are exact; without, nothing synchronises and the views span the capacity.
    #[pyo3(signature = (stream, layout, x, x_scales = None, topk_idx = None, topk_weights = None, expert_alignment = 1, handle = None, wait_for_counts = true))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        py: Python<'_>,
        stream: usize,
        layout: &PyHtLayout,
        x: &Bound<'_, PyAny>,
        x_scales: Option<&Bound<'_, PyAny>>,
        topk_idx: Option<&Bound<'_, PyAny>>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        expert_alignment: usize,
        handle: Option<&mut PyHtHandle>,
        wait_for_counts: bool,
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
        let mut guard = self.buf()?;
        let buf: &mut HtBuffer = &mut guard;
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
                wait_for_counts,
            };
            match handle {
                Some(h) => buf.cached_dispatch(&s, &mut h.h, &args).map(|_| None),
                None => buf.dispatch(&s, ll, &args).map(|(h, _)| Some(h)),
            }
        });
        Ok(r.map_err(py_err)?.map(|h| PyHtHandle { h, fp8 }))
    }

    /// DLPack capsules of what `handle` received: `(x, scales or None, topk_idx int32 or None,
    /// topk_weights float32 or None, src_idx int32)`, `num_recv` rows each (the capacity when
    /// the dispatch did not wait for the counts; top-k only when the dispatch sent them); valid
    /// until the next dispatch of this buffer.
    #[allow(clippy::type_complexity)]
    fn recv_views(
        slf: &Bound<'_, Self>,
        handle: &PyHtHandle,
    ) -> PyResult<(PyObject, Option<PyObject>, Option<PyObject>, Option<PyObject>, PyObject)> {
        let py = slf.py();
        let me = slf.borrow();
        let (h, dev, k) = (&handle.h, me.g.device() as i32, handle.h.layout().k());
        // The addresses under the lock; errors become Python exceptions and capsules are made
        // after it (either may run Python).
        let (n, hd, x, scales, idx, wts, src) = {
            let b = me.buf()?;
            (
                h.num_recv().unwrap_or(b.config().capacity(me.g.world())),
                b.config().hidden,
                if handle.fp8 { b.recv_x_fp8(h).map(|v| v.device_addr()) } else { b.recv_x_bf16(h).map(|v| v.device_addr()) },
                handle.fp8.then(|| b.recv_scales(h).map(|v| v.device_addr())),
                // (The views above check the handle: an error here means the dispatch sent no top-k.)
                b.recv_topk_idx(h).ok().map(|v| v.device_addr()),
                b.recv_topk_weights(h).ok().map(|v| v.device_addr()),
                b.recv_src_idx(h).map(|v| v.device_addr()),
            )
        };
        let owner = || slf.clone().into_any().unbind();
        let x = dlpack(py, x.map_err(py_err)?, &[n, hd], if handle.fp8 { DT_U8 } else { DT_BF16 }, dev, owner())?;
        let scales = scales.map(|a| dlpack(py, a.map_err(py_err)?, &[n, hd / 128], DT_F32, dev, owner())).transpose()?;
        let idx = idx.map(|a| dlpack(py, a, &[n, k], DT_I32, dev, owner())).transpose()?;
        let wts = wts.map(|a| dlpack(py, a, &[n, k], DT_F32, dev, owner())).transpose()?;
        Ok((x, scales, idx, wts, dlpack(py, src.map_err(py_err)?, &[n], DT_I32, dev, owner())?))
    }

    /// Combine: expert outputs `x` (`bf16 [num_recv, hidden]`, in the dispatch's receive order)
    /// back to their homes, summed in rank order into `out` (`bf16 [N, hidden]`); with
    /// `topk_weights` (`float32 [num_recv, k]`), their sums into `out_weights` (`float32 [N, k]`).
    /// `x` may hold more rows than were received (a dispatch that did not wait for the counts:
    /// the capacity, or fewer if at least the received count).
    #[pyo3(signature = (stream, handle, x, out, topk_weights = None, out_weights = None, bias = None, bias1 = None))]
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
        bias1: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let dev = self.g.device() as i64;
        let h = &handle.h;
        let (n, k, hd) = (h.layout().num_tokens(), h.layout().k(), self.buf()?.config().hidden);
        let xi = check("x", x, &["torch.bfloat16"], &[h.num_recv(), Some(hd)], dev)?;
        let r = xi.shape[0];
        let oi = check("out", out, &["torch.bfloat16"], &[Some(n), Some(hd)], dev)?;
        let wi = topk_weights.map(|w| check("topk_weights", w, &["torch.float32"], &[Some(r), Some(k)], dev)).transpose()?;
        let owi = out_weights.map(|w| check("out_weights", w, &["torch.float32"], &[Some(n), Some(k)], dev)).transpose()?;
        let bi = bias.map(|b| check("bias", b, &["torch.bfloat16"], &[Some(n), Some(hd)], dev)).transpose()?;
        let b1i = bias1.map(|b| check("bias", b, &["torch.bfloat16"], &[Some(n), Some(hd)], dev)).transpose()?;
        let (xr, or) = (Raw::<bf16>::of(&xi), Raw::<bf16>::of(&oi));
        let wr = wi.as_ref().map(Raw::<f32>::of);
        let owr = owi.as_ref().map(Raw::<f32>::of);
        let br = bi.as_ref().map(Raw::<bf16>::of);
        let b1r = b1i.as_ref().map(Raw::<bf16>::of);
        let args = ht::CombineArgs {
            x: &xr,
            topk_weights: wr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
            bias: [br.as_ref().map(|b| b as &dyn DeviceArg<bf16>), b1r.as_ref().map(|b| b as &dyn DeviceArg<bf16>)],
            out: &or,
            out_weights: owr.as_ref().map(|w| w as &dyn DeviceArg<f32>),
        };
        let s = stream_of(&self.g, stream);
        let r = self.buf()?.combine(&s, h, &args);
        r.map(|_| ()).map_err(py_err)
    }
}
