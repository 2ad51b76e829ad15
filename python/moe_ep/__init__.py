"""moe-ep for torch: expert-parallel dispatch and combine (Rust kernels) on torch tensors.

An API shaped like ``deep_ep.Buffer``: ``get_dispatch_layout`` / ``dispatch`` / ``combine``
(high-throughput, prefill) and ``low_latency_dispatch`` / ``low_latency_combine`` (decode). See
``python/README.md`` for what differs from DeepEP.

Tensors are read through ``data_ptr`` after a check of dtype, device, shape and contiguity
(``InvalidArgument`` otherwise, before anything launches). Work runs on torch's current CUDA
stream. Received rows are views of the buffer's memory (``torch.from_dlpack``), valid until the
dispatch after next. The rendezvous runs over ``torch.distributed`` (``all_gather_object`` on the
caller's process group), so under torchrun it needs no port of its own.
"""

import os

from ._moe_ep import (  # noqa: F401
    GroupFailed,
    InvalidArgument,
    MoeEpError,
    NoDevice,
    PeerFailed,
    Timeout,
    __version__,
    check_tensor,
    device_count,
    nvshmem_module,
    nvshmem_status,
    tensor_path,
)
from . import _moe_ep

__all__ = [
    "Buffer",
    "DispatchHandle",
    "EventOverlap",
    "Group",
    "GroupFailed",
    "InvalidArgument",
    "MoeEpError",
    "NoDevice",
    "PeerFailed",
    "Timeout",
    "device_count",
    "dist_backend",
    "group_from_torch",
    "ll_transport",
    "local_device",
    "shares_gpu",
]

Group = _moe_ep.Group


def _invalid(argument, message):
    e = InvalidArgument(f"invalid argument `{argument}`: {message}")
    e.kind, e.argument, e.rank, e.phase, e.peer = "InvalidArgument", argument, None, None, None
    return e


def group_from_torch(process_group=None, timeout_s=10.0):
    """A moe-ep group of the ranks of ``process_group`` (default: the world), one GPU each
    (``torch.cuda.current_device()``; several ranks may share one under CUDA MPS with
    ``MOE_EP_SHARE_GPU=1``). Collective.

    The ranks meet over moe-ep's own TCP rendezvous, whose address, port and secret rank 0 of
    the group picks and hands to the others over ``process_group``: the group then watches its
    peers, so a peer that dies, fails or aborts stops this rank's waits within milliseconds and
    every later call raises ``GroupFailed``/``PeerFailed`` naming it. Rank 0 listens on
    ``127.0.0.1`` when every rank is on its host, else where ``_rendezvous_addr`` says. Its port
    is one the OS had free a moment before (a small window in which another process may take
    it; the rendezvous then fails with "cannot listen")."""
    import secrets
    import socket

    import torch
    import torch.distributed as dist

    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname(), group=process_group)
    offer = None
    if rank == 0:
        addr = _rendezvous_addr(hosts, dist.get_rank())
        with socket.socket() as s:
            s.bind((addr, 0))
            port = s.getsockname()[1]
        offer = (addr, port, secrets.token_hex(16))
    offers = [None] * world
    dist.all_gather_object(offers, offer, group=process_group)
    addr, port, secret = offers[0]
    return Group.connect(rank, world, torch.cuda.current_device(), addr, port, secret, timeout_s)


def _rendezvous_addr(hosts, global_rank):
    """Where rank 0 of a group listens: loopback when every rank is on its host, else
    ``MOE_EP_MASTER_ADDR``, else torchrun's ``MASTER_ADDR`` when rank 0 is the job's rank 0, else
    its host's address (refused if that is a loopback address, which other hosts cannot reach)."""
    import os
    import socket

    if len(set(hosts)) == 1:
        return "127.0.0.1"
    if os.environ.get("MOE_EP_MASTER_ADDR"):
        return os.environ["MOE_EP_MASTER_ADDR"]
    if global_rank == 0 and os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    addr = socket.gethostbyname(socket.gethostname())
    if addr.startswith("127."):
        raise _invalid("MOE_EP_MASTER_ADDR", f"the ranks span {len(set(hosts))} hosts and this host's name resolves to {addr}; set MOE_EP_MASTER_ADDR to an address of rank 0's host the others can reach")
    return addr


def _ll_transport(requested=None, group=None):
    """The low-latency buffers' transport: ``requested``, else ``MOE_EP_LL_TRANSPORT``, else
    ``"nvshmem"`` where ``group``'s ranks span nodes (``Group.spans_nodes``), else ``"ipc"``
    (moe-ep's own heap: the default inside a node). For ``"nvshmem"`` (the buffer in
    NVSHMEM's symmetric memory) the NVSHMEM host library and its unique-id bootstrap plugin are
    taken from the ``nvidia-nvshmem-cu13`` wheel (which torch's CUDA 13 wheels bring) unless
    ``NVSHMEM_HOST_LIB`` and ``NVSHMEM_BOOTSTRAP_UID_PLUGIN`` name them."""
    t = requested or os.environ.get("MOE_EP_LL_TRANSPORT") or ("nvshmem" if group is not None and group.spans_nodes else "ipc")
    if t == "nvshmem":
        try:
            import nvidia.nvshmem as _nv

            lib = os.path.join(list(_nv.__path__)[0], "lib")
        except ImportError:
            lib = None
        if lib is not None:
            os.environ.setdefault("NVSHMEM_HOST_LIB", os.path.join(lib, "libnvshmem_host.so.3"))
            os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_PLUGIN", os.path.join(lib, "nvshmem_bootstrap_uid.so.3"))
    return t


ll_transport = _ll_transport


def shares_gpu():
    """True where this process's ranks share GPUs: ``MOE_EP_SHARE_GPU=1`` (several ranks on one
    GPU under CUDA MPS, for development on a one-GPU machine; ``Group`` then accepts it), read
    as the library reads it."""
    return _moe_ep._share_gpu_env()


def local_device():
    """This rank's CUDA device under torchrun: ``LOCAL_RANK``, or the one GPU every rank shares
    (``MOE_EP_SHARE_GPU=1``)."""
    import os

    return 0 if shares_gpu() else int(os.environ.get("LOCAL_RANK", "0"))


def dist_backend():
    """The ``torch.distributed`` backend for the caller's own collectives: ``nccl``, or ``gloo``
    where ranks share a GPU (NCCL refuses two ranks on one GPU). moe-ep's own rendezvous works
    over either."""
    return "gloo" if shares_gpu() else "nccl"


class EventOverlap:
    """A CUDA event recorded on the current stream after an operation (like DeepEP's)."""

    def __init__(self, event=None):
        self.event = event

    def current_stream_wait(self):
        import torch

        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


_NO_EVENT = EventOverlap()


def _raw_stream_fn():
    try:
        import torch

        return getattr(torch._C, "_cuda_getCurrentRawStream", None)
    except ImportError:
        return None


_raw_stream = _raw_stream_fn()


def _event(async_finish):
    """DeepEP's ``async_finish``: an event recorded on the current stream, or an empty one."""
    import torch

    if not async_finish:
        return EventOverlap()
    e = torch.cuda.Event()
    e.record(torch.cuda.current_stream())
    return EventOverlap(e)


class DispatchHandle:
    """What ``Buffer.dispatch`` returns for the combine (and a cached dispatch)."""

    def __init__(self, h, layout, num_tokens, num_topk):
        self._h, self._layout, self.num_tokens, self.num_topk = h, layout, num_tokens, num_topk

    @property
    def num_recv(self):
        return self._h.num_recv


class Buffer:
    """``deep_ep.Buffer``'s role on moe-ep.

    ``Buffer(group, hidden, num_experts, num_topk, num_max_dispatch_tokens_per_rank=128,
    num_max_tokens_per_rank=0, num_sms=None, ll_transport=None)``: ``group`` is a moe-ep
    ``Group`` or a torch process group (``None``: the world). A low-latency buffer is built when
    ``num_max_dispatch_tokens_per_rank > 0`` (on ``ll_transport``, see ``ll_transport()``), a
    high-throughput one when ``num_max_tokens_per_rank > 0``. Collective.
    """

    def __init__(
        self,
        group=None,
        hidden=7168,
        num_experts=256,
        num_topk=8,
        num_max_dispatch_tokens_per_rank=128,
        num_max_tokens_per_rank=0,
        num_sms=None,
        ll_transport=None,
    ):
        if not isinstance(group, Group):
            group = group_from_torch(group)
        self.group = group
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.hidden = hidden
        self.num_experts = num_experts
        self._ll = None
        self._ht = None
        self._layout = None
        self._ll_cache = {}
        if num_max_dispatch_tokens_per_rank > 0:
            self._ll = _moe_ep.LowLatencyBuffer(group, num_experts, hidden, num_topk, num_max_dispatch_tokens_per_rank, _ll_transport(ll_transport, group))
        if num_max_tokens_per_rank > 0:
            self._ht = _moe_ep.HighThroughputBuffer(group, num_experts, hidden, num_topk, num_max_tokens_per_rank, num_sms)

    def destroy(self):
        """Collective: releases the buffer's memory on every rank (every rank calls it at the
        same point). Tensors that view the buffer's memory must not be used afterwards.
        Dropping a Buffer instead runs no collective: its memory is kept until every rank has
        dropped it, and freed at the group's next buffer creation."""
        for part in (self._ll, self._ht):
            if part is not None:
                part.destroy()
        self._ll = self._ht = None
        self._layout = None
        self._ll_cache = {}
        self._destroyed = True

    def _need(self, which):
        if getattr(self, "_destroyed", False):
            raise MoeEpError("the buffer was destroyed")
        buf = self._ll if which == "low-latency" else self._ht
        if buf is None:
            arg = "num_max_dispatch_tokens_per_rank" if which == "low-latency" else "num_max_tokens_per_rank"
            raise _invalid(arg, f"this Buffer has no {which} part (build it with {arg} > 0)")
        return buf

    # ----- high-throughput (prefill) -----

    def get_dispatch_layout(self, topk_idx, num_experts=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        """The routing of ``topk_idx`` (int64 ``[N, k]``). Returns ``(num_tokens_per_rank,
        None, num_tokens_per_expert, is_token_in_rank, event)`` like DeepEP (no RDMA counts on
        one node); ``dispatch`` uses the buffer's latest layout."""
        import torch

        ht = self._need("high-throughput")
        self._check_shape(None, num_experts)
        self._layout = ht.layout(self._stream(), topk_idx)
        tpr, tpe, in_rank = (torch.from_dlpack(c) for c in self._layout.views())
        event = _event(async_finish)
        return tpr, None, tpe, in_rank.view(torch.bool), event

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
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """Sends every token to each rank holding one of its experts. ``x``: bf16 ``[N, hidden]``
        or ``(float8_e4m3fn [N, hidden], float32 scales [N, hidden / 128])``. With ``handle`` it
        is a cached dispatch (same routing, no count exchange). Returns ``(recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``. Differences: the
        received tensors are views of the buffer (valid until its next dispatch), and
        ``recv_topk_idx`` is int32 (local expert ids, -1 elsewhere)."""
        import torch

        ht = self._need("high-throughput")
        if handle is not None:
            layout = handle._layout
        else:
            layout = self._layout
            if layout is None:
                raise _invalid("is_token_in_rank", "call get_dispatch_layout first: dispatch uses this buffer's latest layout")
            if is_token_in_rank is not None and is_token_in_rank.data_ptr() != torch.from_dlpack(layout.views()[2]).data_ptr():
                raise _invalid("is_token_in_rank", "not the latest layout of this buffer (dispatch uses the latest get_dispatch_layout)")
        xs, scales = (x if isinstance(x, tuple) else (x, None))
        h = ht.dispatch(self._stream(), layout, xs, scales, topk_idx, topk_weights, expert_alignment, None if handle is None else handle._h)
        if handle is None:
            handle = DispatchHandle(h, layout, layout.num_tokens, layout.k)
        rx, rs, ridx, rw, _src = ht.recv_views(handle._h)
        recv_x = (torch.from_dlpack(rx).view(torch.float8_e4m3fn), torch.from_dlpack(rs)) if scales is not None else torch.from_dlpack(rx)
        event = _event(async_finish)
        counts = handle._h.expert_counts
        ridx = None if ridx is None else torch.from_dlpack(ridx)
        rw = None if rw is None else torch.from_dlpack(rw)
        return recv_x, ridx, rw, counts, handle, event

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        """Sends expert outputs ``x`` (bf16 ``[num_recv, hidden]``, receive order) home and sums
        them in rank order (deterministic). Returns ``(combined_x, combined_topk_weights,
        event)``. ``bias``: one bf16 ``[N, hidden]`` tensor (DeepEP takes up to two)."""
        import torch

        ht = self._need("high-throughput")
        n, k = handle.num_tokens, handle.num_topk
        out = torch.empty((n, self.hidden), dtype=torch.bfloat16, device=x.device)
        out_w = None if topk_weights is None else torch.empty((n, k), dtype=torch.float32, device=x.device)
        if isinstance(bias, tuple):
            if len(bias) > 1 and bias[1] is not None:
                raise _invalid("bias", "one bias tensor is bound (the Rust crate takes two)")
            bias = bias[0] if bias else None
        ht.combine(self._stream(), handle._h, x, out, topk_weights, out_w, bias)
        event = _event(async_finish)
        return out, out_w, event

    # ----- low-latency (decode) -----

    def _stream(self):
        # torch's current stream as a raw CUstream, through torch's own fast path where this
        # torch has it (``torch.cuda.current_stream()`` builds a Python object per call).
        if _raw_stream is not None:
            return _raw_stream(self.group.device)
        import torch

        return torch.cuda.current_stream().cuda_stream

    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank=None,
        num_experts=None,
        use_fp8=True,
        round_scale=False,
        use_ue8m0=False,
        async_finish=False,
        return_recv_hook=False,
        topk_weights=None,
        column_major_scales=False,
    ):
        """Sends each token once to every rank holding one of its experts.

        Returns ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is ``(fp8 rows, scales)``
        with ``use_fp8`` (``[E_local, R * T, hidden]`` float8_e4m3fn, scales float32, or int32
        words of four UE8M0 bytes with ``use_ue8m0``), else bf16 rows. ``hook`` (with
        ``return_recv_hook``) runs the receive half. The received tensors are views of the
        buffer's half this dispatch used (the same tensor objects every other dispatch), valid
        until the dispatch after next. Differences from DeepEP: pass ``topk_weights`` here for
        the pre-reduced combine; ``column_major_scales`` gives DeepGEMM's TMA-aligned scale
        layout.
        """
        if num_max_dispatch_tokens_per_rank is not None or num_experts is not None:
            self._check_shape(num_max_dispatch_tokens_per_rank, num_experts)
        fmt = "ue8m0" if use_ue8m0 else ("f32_pow2" if round_scale else "f32")
        ll = self._ll if self._ll is not None else self._need("low-latency")
        stream = self._stream()
        h = ll.dispatch(stream, x, topk_idx, topk_weights, use_fp8, fmt, column_major_scales, return_recv_hook)
        hook = None
        if return_recv_hook:
            # The receive half runs on the dispatch's stream, wherever the hook is called.

            def hook():
                ll.dispatch_recv(stream, h)

        recv_x, count = self._ll_views(ll, h)
        event = _event(async_finish) if async_finish else _NO_EVENT
        return recv_x, count, h, event, hook

    def _ll_views(self, ll, h):
        """``(recv_x, recv_count)`` of ``h``: torch views made once per buffer half and format."""
        key = h.view_key
        views = self._ll_cache.get(key)
        if views is None:
            import torch

            rx, sc, count, _src = ll.recv_views(h)
            rx = torch.from_dlpack(rx)
            recv_x = (rx.view(torch.float8_e4m3fn), torch.from_dlpack(sc)) if h.view_key[1] else rx
            views = self._ll_cache[key] = (recv_x, torch.from_dlpack(count))
        return views

    def low_latency_combine(
        self, x, topk_idx, topk_weights, handle, zero_copy=False, async_finish=False, return_recv_hook=False, out=None, pre_reduced=False
    ):
        """Brings expert outputs ``x`` (bf16 ``[E_local, R * T, hidden]``) back and sums them per
        token into ``out`` (allocated when None). ``pre_reduced``: each expert rank sums its own
        slots first (about half the bytes; uses the weights the dispatch carried, so pass
        ``topk_weights=None``). ``zero_copy``: ``x`` was written into ``get_next_low_latency_combine_buffer``.
        Returns ``(combined_x, event, hook)``. With ``return_recv_hook`` only the send half runs
        now and ``hook()`` runs the receive half on the combine's stream (``combined_x`` is written
        then); the hook holds the tensors the receive half reads and writes."""
        import torch

        ll = self._ll if self._ll is not None else self._need("low-latency")
        if out is None:
            out = torch.empty((topk_idx.shape[0], self.hidden), dtype=torch.bfloat16, device=topk_idx.device)
        weights = None if pre_reduced else topk_weights
        stream = self._stream()
        pending = ll.combine(stream, handle, None if zero_copy else x, topk_idx, out, weights, pre_reduced, return_recv_hook)
        hook = None
        if pending is not None:
            # On the combine's stream (the pending half holds the tensors it reads and writes).

            def hook():
                ll.combine_recv(stream, pending)

        event = _event(async_finish) if async_finish else _NO_EVENT
        return out, event, hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The zero-copy combine input of ``handle`` (bf16 ``[E_local, R * T, hidden]``)."""
        import torch

        return torch.from_dlpack(self._need("low-latency").combine_input(handle))

    def _check_shape(self, tokens, experts):
        if tokens is not None and tokens != self.num_max_dispatch_tokens_per_rank:
            raise _invalid("num_max_dispatch_tokens_per_rank", f"{tokens}, but this buffer was built for {self.num_max_dispatch_tokens_per_rank}")
        if experts is not None and experts != self.num_experts:
            raise _invalid("num_experts", f"{experts}, but this buffer was built for {self.num_experts}")
