"""DeepEP's Python API on moe-ep: ``import moe_ep.deep_ep as deep_ep`` is the switch.

``deep_ep.Buffer``, ``Config``, ``EventOverlap`` and ``topk_idx_t`` with DeepEP's names,
signatures and semantics, for the code paths vLLM and SGLang use (``../shared/ENGINES.md``).
An engine that does ``import deep_ep`` itself finds this module after one line run before it
(``moe_ep.deep_ep.install()``, see ``python/README.md``).

What differs, and why:
- Buffers are sized by the byte budgets passed to ``Buffer`` (``num_nvl_bytes`` for the
  high-throughput part, ``num_rdma_bytes`` for the low-latency part), and built on the first
  call of each kind, once hidden size, expert count and top-k are known (collective: every rank
  makes the same calls). Engines run warm-up passes before capturing CUDA graphs; building a part
  while the current stream is being captured raises ``MoeEpError``.
- One node only: ``num_rdma_bytes`` budgets the low-latency part, ``num_qps_per_rank`` and
  ``allow_mnnvl`` are accepted and unused. ``MOE_EP_LL_TRANSPORT=nvshmem`` puts the
  low-latency part in NVSHMEM's symmetric memory (every rank still reached directly). Not implemented (``NotImplementedError`` naming the
  argument): shrink masks, LogFMT, the wait-cost statistics, ``comm`` (mpi4py), RDMA ranks.
- High-throughput handles are tuples of six like DeepEP's intranode ones:
  ``handle[0]`` is ``int32 [R, R]`` holding this rank's column of DeepEP's rank prefix matrix
  (row ``i``: rows received from ranks ``0..=i``; other columns are -1), ``handle[3]`` the
  received rows' source token indices, ``handle[4]`` ``is_token_in_rank``.
"""

import functools
import sys
import threading

try:
    import torch
except ImportError:  # the API surface still imports (CI's CPU checks); every call needs torch
    torch = None

from . import _moe_ep
from ._moe_ep import InvalidArgument, MoeEpError

__all__ = ["Buffer", "Config", "EventOverlap", "install", "topk_idx_t"]

#: The dtype of expert indices (``topk_idx``).
topk_idx_t = torch.int64 if torch is not None else None

# What the size hints cover: tokens per rank (high-throughput), top-k and experts per rank.
_HINT_TOKENS = 4096
_HINT_TOPK = 16
_HINT_EXPERTS_PER_RANK = 256


def install():
    """Makes ``import deep_ep`` find this module (run before the engine imports deep_ep)."""
    sys.modules["deep_ep"] = sys.modules[__name__]
    return sys.modules[__name__]


def _invalid(argument, message):
    e = InvalidArgument(f"invalid argument `{argument}`: {message}")
    e.kind, e.argument, e.rank, e.phase, e.peer = "InvalidArgument", argument, None, None, None
    return e


def _unsupported(argument, why):
    return NotImplementedError(f"moe_ep.deep_ep: `{argument}` is not supported: {why}")


#: DeepEP's ``EventOverlap(event=None, extra_tensors=None)``: a CUDA event after an operation
#: (``event`` is None when the caller's stream already waits for it), and the tensors to keep
#: alive until it is waited for; ``current_stream_wait()``, and a context manager that waits on
#: exit. In the extension, so that a low-latency call makes one without running Python.
EventOverlap = _moe_ep.EventOverlap


class Config:
    """DeepEP's launch configuration. moe-ep reads ``num_sms`` (the high-throughput kernels'
    blocks); the chunk sizes are kept for the size hints' signature and not used."""

    def __init__(
        self,
        num_sms=20,
        num_max_nvl_chunked_send_tokens=6,
        num_max_nvl_chunked_recv_tokens=256,
        num_max_rdma_chunked_send_tokens=6,
        num_max_rdma_chunked_recv_tokens=256,
    ):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """Bytes of a high-throughput part for rows of ``hidden_bytes`` (bf16) and up to 4096
        tokens per rank (top-k up to 16, up to 256 experts per rank)."""
        hidden = -(-(hidden_bytes // 2) // 128) * 128
        return _moe_ep.ht_heap_bytes(num_ranks, num_ranks * _HINT_EXPERTS_PER_RANK, hidden, _HINT_TOPK, _HINT_TOKENS)

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """0: one node needs no RDMA buffer."""
        return 0


class _HtHandle(tuple):
    """DeepEP's intranode handle ``(rank_prefix_matrix, channel_prefix_matrix,
    recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head)`` (the channel
    entries and ``send_head`` are None), carrying moe-ep's own handle."""


def _ue8m0_to_f32(scales, groups):
    """int32-packed UE8M0 scales (four exponent bytes per word) to float32 ``[N, groups]``."""
    b = scales.contiguous().view(torch.uint8)[:, :groups]
    return (b.to(torch.int32) << 23).view(torch.float32)


def _f32_to_ue8m0(scales):
    """float32 powers of two ``[N, G]`` to int32-packed UE8M0 ``[N, ceil(G / 4)]``."""
    n, g = scales.shape
    e = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    words = -(-g // 4)
    packed = torch.zeros((n, words * 4), dtype=torch.uint8, device=scales.device)
    packed[:, :g] = e
    return packed.view(torch.int32)


def _make_ll_views(ll, h):
    """``(recv_x, recv_count, src_info)`` viewing what ``h`` received (one of the buffer's
    two halves: valid until the dispatch after next, as DeepEP's). The extension keeps them
    per half and format and hands the same tensor objects out again while they are intact;
    one that the caller altered (SGLang's ``x.set_(empty)``, a ``resize_``) is replaced by a
    view made here, so no caller's change reaches a later call. (New objects on every call
    would cost about 18 us of host time per dispatch: ``python/README.md``.)"""
    rx, sc, count, src = ll.recv_views(h)
    rx = torch.from_dlpack(rx)
    if h.view_key[1]:
        rx = rx.view(torch.float8_e4m3fn)
    recv_x = rx
    if sc is not None:
        # Column-major, as DeepEP's: the [E, groups, rows] storage seen as [E, rows, groups].
        recv_x = (rx, torch.from_dlpack(sc).transpose(1, 2)[:, : ll.world * h[2]])
    return recv_x, torch.from_dlpack(count), torch.from_dlpack(src)


class Buffer(_moe_ep.DeepEpBufferBase):
    """``deep_ep.Buffer`` on moe-ep (one node). Collective construction; every object is usable
    from any Python thread. ``low_latency_dispatch`` and ``low_latency_combine`` are the
    extension's (its base class): one call each, no Python of this package on the way, so a
    decode step pays the extension's cost alone (``python/examples/overhead.py``)."""

    #: SMs (blocks) of the high-throughput kernels (``set_num_sms``).
    num_sms = 20

    def __init__(
        self,
        group=None,
        num_nvl_bytes=0,
        num_rdma_bytes=0,
        low_latency_mode=False,
        num_qps_per_rank=24,
        allow_nvlink_for_low_latency_mode=True,
        allow_mnnvl=False,
        explicitly_destroy=False,
        enable_shrink=False,
        comm=None,
    ):
        if enable_shrink:
            raise _unsupported("enable_shrink", "rank masks are not implemented")
        if comm is not None:
            raise _unsupported("comm", "pass a torch process group as `group`")
        if not allow_nvlink_for_low_latency_mode:
            raise _unsupported("allow_nvlink_for_low_latency_mode", "moe-ep's low-latency kernels run over NVLink within a node")
        from . import Group, group_from_torch

        self._group = group if isinstance(group, Group) else group_from_torch(group)
        self.group = group
        self.rank = self._group.rank
        self.group_size = self._group.world
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.runtime = None
        self._lock = threading.RLock()
        self._ht = None
        self._ht_key = None
        # The smallest SM share of the group (collective, as the constructor is): the
        # high-throughput grid every rank can launch.
        self._min_sms = self._group.min_sm_count()
        # (buffer, key, received views) of the low-latency part, one attribute so that the
        # lock-free fast path reads them together.
        self._ll_state = (None, None, None)
        self._device = self._group.device
        self._comm_stream = torch.cuda.Stream(device=self._device)
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is None:
            raw = lambda _device: torch.cuda.current_stream().cuda_stream  # noqa: E731
        self._raw_stream = functools.partial(raw, self._device)
        # What the extension's low-latency calls read: the stream source, the device, the views.
        self._init_fast(raw, self._device, _make_ll_views)

    @property
    def _ll(self):
        """The low-latency part, or None."""
        return self._ll_state[0]

    @property
    def _ll_key(self):
        return self._ll_state[1]

    # ----- static and configuration -----

    @staticmethod
    def is_sm90_compiled():
        return True

    @staticmethod
    def set_num_sms(new_num_sms):
        """Sets the high-throughput kernels' blocks for every buffer (applied at their next call)."""
        if int(new_num_sms) < 2:
            raise _invalid("new_num_sms", f"{new_num_sms}: the kernels need at least 2 blocks")
        Buffer.num_sms = int(new_num_sms)

    @staticmethod
    def capture():
        """An ``EventOverlap`` recorded on the current stream."""
        e = torch.cuda.Event()
        e.record(torch.cuda.current_stream())
        return EventOverlap(e)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """Bytes of a low-latency part for these shapes (any top-k up to 16)."""
        return _moe_ep.ll_heap_bytes(num_ranks, num_experts, hidden, _HINT_TOPK, num_max_dispatch_tokens_per_rank)

    @staticmethod
    def get_dispatch_config(num_ranks):
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks):
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    def get_comm_stream(self):
        """The stream the high-throughput calls run on."""
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise _unsupported("get_local_buffer_tensor", "moe-ep's buffers are laid out by the library; use the calls' outputs")

    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        raise _unsupported("enable_shrink", "rank masks are not implemented")

    def low_latency_query_mask_buffer(self, mask_status):
        raise _unsupported("enable_shrink", "rank masks are not implemented")

    def low_latency_clean_mask_buffer(self):
        raise _unsupported("enable_shrink", "rank masks are not implemented")

    def destroy(self):
        """Collective: releases the buffer on every rank (needs ``explicitly_destroy=True``, as
        in DeepEP). Without it, dropping the buffer keeps its memory until every rank has dropped
        it, then the group frees it."""
        if not self.explicitly_destroy:
            raise _invalid("explicitly_destroy", "destroy() needs a Buffer built with explicitly_destroy=True")
        with self._lock:
            for part in (self._ll, self._ht):
                if part is not None:
                    part.destroy()
            self._ht = self._ht_key = None
            self._ll_state = (None, None, None)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Nothing to clean: moe-ep's low-latency part leaves its counters reset after every
        call, and the high-throughput part has its own memory. Checks the shapes."""
        _moe_ep.ll_heap_bytes(self.group_size, num_experts, hidden, _HINT_TOPK, num_max_dispatch_tokens_per_rank)

    # ----- parts -----

    def _check_not_capturing(self, what):
        if torch.cuda.is_current_stream_capturing():
            raise MoeEpError(
                f"moe_ep.deep_ep: the {what} part for these shapes would be built during CUDA graph capture; "
                "run a warm-up call with the same shapes before capturing"
            )

    def _ll_for(self, tokens, hidden, num_experts, k):
        """``(buffer, views)`` of the low-latency part for these shapes, built when missing or
        too small (collective): the extension's ``low_latency_dispatch`` calls it the first
        time, from the shapes it checked."""
        with self._lock:
            self._ll_part(tokens, hidden, num_experts, k)
            ll, _, views = self._ll_state
            return ll, views

    def _ll_part(self, tokens, hidden, num_experts, k):
        key = (tokens, hidden, num_experts)
        if self._ll is not None and self._ll_key[:3] == key and k <= self._ll_key[3]:
            return self._ll
        self._check_not_capturing("low-latency")
        need = _moe_ep.ll_heap_bytes(self.group_size, num_experts, hidden, k, tokens)
        if need > self.num_rdma_bytes:
            raise _invalid(
                "num_rdma_bytes",
                f"{self.num_rdma_bytes} bytes, but the low-latency part for {tokens} tokens per rank, hidden {hidden}, "
                f"{num_experts} experts and top-{k} needs {need} (Buffer.get_low_latency_rdma_size_hint)",
            )
        if self._ll is not None:
            self._ll.destroy()
            self._ll_state = (None, None, None)
        from . import ll_transport

        ll = _moe_ep.LowLatencyBuffer(self._group, num_experts, hidden, k, tokens, ll_transport(None, self._group))
        self._ll_state = (ll, (tokens, hidden, num_experts, k), _moe_ep.LowLatencyViews())
        return ll

    def _ht_part(self, hidden, num_experts, k, tokens, num_sms):
        if self._ht is not None and self._ht_key[:2] == (hidden, num_experts) and k <= self._ht_key[2] and tokens <= self._ht_key[3]:
            part = self._ht
        else:
            self._check_not_capturing("high-throughput")
            world = self.group_size
            lo, hi = 0, 1 << 20
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _moe_ep.ht_heap_bytes(world, num_experts, hidden, k, mid) <= self.num_nvl_bytes:
                    lo = mid
                else:
                    hi = mid - 1
            if lo < max(tokens, 1):
                need = _moe_ep.ht_heap_bytes(world, num_experts, hidden, k, max(tokens, 1))
                raise _invalid(
                    "num_nvl_bytes",
                    f"{self.num_nvl_bytes} bytes, but {tokens} tokens per rank of hidden {hidden}, {num_experts} experts and "
                    f"top-{k} need {need} (Config.get_nvl_buffer_size_hint)",
                )
            if self._ht is not None:
                self._ht.destroy()
                self._ht = None
            part = self._ht = _moe_ep.HighThroughputBuffer(self._group, num_experts, hidden, k, lo, num_sms)
            self._ht_key = (hidden, num_experts, k, lo)
        if part.num_sms != num_sms:
            part.set_num_sms(num_sms)
        return part

    def _num_sms(self, config):
        """The high-throughput grid: the config's (or ``Buffer.num_sms``), capped by the
        smallest SM share of the group (the same on every rank)."""
        want = config.num_sms if config is not None else Buffer.num_sms
        return max(2, min(int(want), self._min_sms))

    # ----- streams (high-throughput calls run on the communication stream) -----

    def _begin(self, previous_event):
        compute = torch.cuda.current_stream()
        comm = self._comm_stream
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(compute)
        return compute, comm

    def _end(self, compute, comm, async_finish, tensors):
        if async_finish:
            e = torch.cuda.Event()
            e.record(comm)
            return EventOverlap(e, tuple(t for t in tensors if t is not None))
        compute.wait_stream(comm)
        return EventOverlap()

    @staticmethod
    def _alloc_stream(compute, comm, allocate_on_comm_stream):
        return comm if allocate_on_comm_stream else compute

    @staticmethod
    def _own(tensors, compute, comm, allocate_on_comm_stream):
        """Outputs are used on both streams: those allocated on `compute` (written on `comm`)
        are recorded on `comm`, those allocated on `comm` (read by the caller on `compute`) on
        `compute`, as DeepEP does."""
        other = compute if allocate_on_comm_stream else comm
        for t in tensors:
            if t is not None:
                t.record_stream(other)

    # ----- high-throughput (prefill) -----

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        """``(num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event)`` of
        ``topk_idx`` (``int64 [N, k]``, -1 for none): new tensors, computed on the GPU without
        a host synchronisation."""
        if topk_idx.dtype != torch.int64:
            raise _invalid("topk_idx", f"dtype {topk_idx.dtype}, expected deep_ep.topk_idx_t (torch.int64)")
        world = self.group_size
        if num_experts % world != 0 or num_experts < world:
            raise _invalid("num_experts", f"{num_experts} is not a positive multiple of the {world} ranks")
        epr = num_experts // world
        compute, comm = self._begin(previous_event)
        with torch.cuda.stream(self._alloc_stream(compute, comm, allocate_on_comm_stream)):
            n = topk_idx.shape[0]
            per_rank = torch.empty((world,), dtype=torch.int32, device=topk_idx.device)
            per_expert = torch.empty((num_experts,), dtype=torch.int32, device=topk_idx.device)
            in_rank = torch.empty((n, world), dtype=torch.bool, device=topk_idx.device)
        self._own((per_rank, per_expert, in_rank), compute, comm, allocate_on_comm_stream)
        with torch.cuda.stream(comm):
            topk_idx.record_stream(comm)
            valid = topk_idx >= 0
            experts = torch.where(valid, topk_idx, num_experts)
            counts = torch.zeros((num_experts + 1,), dtype=torch.int32, device=topk_idx.device)
            counts.scatter_add_(0, experts.flatten(), torch.ones_like(experts.flatten(), dtype=torch.int32))
            per_expert.copy_(counts[:num_experts])
            ranks = torch.where(valid, topk_idx // epr, world)
            hit = torch.zeros((n, world + 1), dtype=torch.bool, device=topk_idx.device)
            hit.scatter_(1, ranks, True)
            in_rank.copy_(hit[:, :world])
            per_rank.copy_(in_rank.sum(0, dtype=torch.int32))
        event = self._end(compute, comm, async_finish, (topk_idx, per_rank, per_expert, in_rank))
        return per_rank, None, per_expert, in_rank, event

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment=1,
        num_worst_tokens=0,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """DeepEP's dispatch: returns ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event)``, all new tensors that stay valid after
        later calls. ``x``: bf16 ``[N, H]`` or ``(float8_e4m3fn [N, H], scales)`` with float32
        ``[N, H / 128]`` scales (any strides) or int32-packed UE8M0 ``[N, ceil(H / 512)]``
        (received in the same format). With ``num_worst_tokens`` nothing synchronises the host:
        the received tensors have that many rows and the per-expert list is empty."""
        if num_tokens_per_rdma_rank is not None:
            raise _unsupported("num_tokens_per_rdma_rank", "moe-ep runs within one node")
        xs, scales = x if isinstance(x, tuple) else (x, None)
        hidden = xs.shape[1]
        ue8m0 = scales is not None and scales.dtype == torch.int32
        with self._lock:
            compute, comm = self._begin(previous_event)
            with torch.cuda.stream(comm):
                for t in (xs, scales, topk_idx, topk_weights):
                    if t is not None:
                        t.record_stream(comm)
                # On the communication stream, after `previous_event` (the caller's inputs are
                # ready from there).
                if scales is not None:
                    scales = _ue8m0_to_f32(scales, hidden // 128) if ue8m0 else scales.contiguous()
                if handle is None:
                    if topk_idx is None:
                        raise _invalid("topk_idx", "a dispatch without a handle needs topk_idx")
                    if num_tokens_per_expert is None:
                        raise _invalid("num_tokens_per_expert", "a dispatch without a handle needs the layout (get_dispatch_layout)")
                    num_experts, k = num_tokens_per_expert.shape[0], topk_idx.shape[1]
                    part = self._ht_part(hidden, num_experts, k, xs.shape[0], self._num_sms(config))
                    stream = self._raw_stream()
                    layout = part.layout(stream, topk_idx)
                    h = part.dispatch(stream, layout, xs.contiguous(), scales, topk_idx, topk_weights, expert_alignment, None, num_worst_tokens == 0)
                    n_tokens, in_rank_t = xs.shape[0], is_token_in_rank
                else:
                    if topk_idx is not None or topk_weights is not None:
                        raise _invalid("topk_idx", "a cached dispatch (with handle) takes no topk_idx or topk_weights")
                    part, h, layout = handle._part, handle._h, handle._layout
                    self._num_sms_check(part, config)
                    stream = self._raw_stream()
                    part.dispatch(stream, layout, xs.contiguous(), scales, None, None, expert_alignment, h, num_worst_tokens == 0)
                    n_tokens, in_rank_t = handle._num_tokens, handle[4]
                rx, rs, ridx, rw, rsrc = part.recv_views(h)
                rows = h.num_recv if h.num_recv is not None else num_worst_tokens
                whole = [torch.from_dlpack(c) if c is not None else None for c in (rx, rs, ridx, rw, rsrc)]
                if num_worst_tokens and whole[0].shape[0] < num_worst_tokens:
                    raise _invalid(
                        "num_worst_tokens",
                        f"{num_worst_tokens} rows, but the high-throughput part receives at most {whole[0].shape[0]} (num_nvl_bytes)",
                    )
                views = [v[:rows] if v is not None else None for v in whole]
            with torch.cuda.stream(self._alloc_stream(compute, comm, allocate_on_comm_stream)):
                outs = [torch.empty_like(v) if v is not None else None for v in views]
                prefix = torch.empty((self.group_size, self.group_size), dtype=torch.int32, device=xs.device)
            self._own(outs + [prefix], compute, comm, allocate_on_comm_stream)
            with torch.cuda.stream(comm):
                for o, v in zip(outs, views):
                    if o is not None:
                        o.copy_(v)
                base = torch.from_dlpack(h.src_base(self._device))
                prefix.fill_(-1)
                prefix[:, self.rank].copy_(base[1:])
                if num_worst_tokens and outs[2] is not None:
                    # Rows past what arrived hold no token: their expert ids are -1, as DeepEP's.
                    past = torch.arange(rows, device=xs.device) >= base[self.group_size]
                    outs[2].masked_fill_(past[:, None], -1)
                recv_x, recv_scales, recv_idx, recv_w, recv_src = outs
                # Made here, on the communication stream: the caller's stream uses them too.
                made = []
                if scales is not None:
                    recv_x = recv_x.view(torch.float8_e4m3fn)
                    if ue8m0:
                        recv_scales = _f32_to_ue8m0(recv_scales)
                        made.append(recv_scales)
                    recv_x = (recv_x, recv_scales)
                if recv_idx is not None:
                    recv_idx = recv_idx.to(torch.int64)
                    made.append(recv_idx)
                # Always allocated here, on the communication stream, and read by the caller's.
                for t in made:
                    t.record_stream(compute)
        counts = list(h.expert_counts) if (h.expert_counts is not None and not num_worst_tokens) else []
        if handle is None:
            handle = _HtHandle((prefix, None, None, recv_src, in_rank_t, None))
            handle._part, handle._h, handle._layout, handle._num_tokens = part, h, layout, n_tokens
        event = self._end(compute, comm, async_finish, (xs, scales, topk_idx, topk_weights, *outs, prefix))
        return recv_x, recv_idx, recv_w, counts, handle, event

    def _num_sms_check(self, part, config):
        want = self._num_sms(config)
        if part.num_sms != want:
            part.set_num_sms(want)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        """DeepEP's combine: ``(combined_x, combined_topk_weights, event)``, new tensors. ``x``:
        bf16 ``[num_recv, H]`` in the dispatch's receive order; ``bias``: a tensor or a pair;
        the sum is in rank order (bit-for-bit deterministic)."""
        part, h, n = handle._part, handle._h, handle._num_tokens
        b0, b1 = (bias if isinstance(bias, tuple) else (bias, None)) if bias is not None else (None, None)
        with self._lock:
            self._num_sms_check(part, config)
            compute, comm = self._begin(previous_event)
            with torch.cuda.stream(self._alloc_stream(compute, comm, allocate_on_comm_stream)):
                out = torch.empty((n, x.shape[1]), dtype=torch.bfloat16, device=x.device)
                out_w = None if topk_weights is None else torch.empty((n, topk_weights.shape[1]), dtype=torch.float32, device=x.device)
            self._own((out, out_w), compute, comm, allocate_on_comm_stream)
            with torch.cuda.stream(comm):
                xc = x.contiguous()
                for t in (x, xc, topk_weights, b0, b1):
                    if t is not None:
                        t.record_stream(comm)
                part.combine(self._raw_stream(), h, xc, out, topk_weights, out_w, b0, b1)
        event = self._end(compute, comm, async_finish, (xc, topk_weights, b0, b1, out, out_w))
        return out, out_w, event

    # ----- low-latency (decode) -----
    # low_latency_dispatch and low_latency_combine: the base class's (python/src/deep_ep.rs).

    def get_next_low_latency_combine_buffer(self, handle):
        """The zero-copy combine input of ``handle``'s combine (bf16 ``[E_local, R * T, H]``)."""
        return torch.from_dlpack(handle._ll.combine_input(handle))
