"""moe-ep for torch: expert-parallel dispatch and combine (Rust kernels) on torch tensors.

This first slice covers the low-latency (decode) kernels behind an API shaped like
``deep_ep.Buffer``'s ``low_latency_dispatch`` / ``low_latency_combine``. The high-throughput
kernels are not bound yet. See ``python/README.md`` for what differs from DeepEP.

Tensors are read through ``data_ptr`` after a check of dtype, device, shape and contiguity
(``InvalidArgument`` otherwise, before anything launches). Work runs on torch's current CUDA
stream. Received rows are views of the buffer's memory (``torch.from_dlpack``), valid until the
dispatch after next. The rendezvous runs over ``torch.distributed`` (``all_gather_object`` on the
caller's process group), so under torchrun it needs no port of its own.
"""

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
)
from . import _moe_ep

__all__ = [
    "Buffer",
    "EventOverlap",
    "Group",
    "GroupFailed",
    "InvalidArgument",
    "MoeEpError",
    "NoDevice",
    "PeerFailed",
    "Timeout",
    "device_count",
    "group_from_torch",
]

Group = _moe_ep.Group


def _invalid(argument, message):
    e = InvalidArgument(f"invalid argument `{argument}`: {message}")
    e.kind, e.argument, e.rank, e.phase, e.peer = "InvalidArgument", argument, None, None, None
    return e


def group_from_torch(process_group=None, timeout_s=10.0):
    """A moe-ep group of the ranks of ``process_group`` (default: the world), one GPU each
    (``torch.cuda.current_device()``). Collective."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)

    def all_gather(blob):
        out = [None] * world
        dist.all_gather_object(out, bytes(blob), group=process_group)
        return out

    return Group(rank, world, torch.cuda.current_device(), all_gather, timeout_s)


class EventOverlap:
    """A CUDA event recorded on the current stream after an operation (like DeepEP's)."""

    def __init__(self, event=None):
        self.event = event

    def current_stream_wait(self):
        import torch

        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


def _event():
    import torch

    e = torch.cuda.Event()
    e.record(torch.cuda.current_stream())
    return EventOverlap(e)


class Buffer:
    """The low-latency half of ``deep_ep.Buffer``.

    ``Buffer(group, num_max_dispatch_tokens_per_rank, hidden, num_experts, num_topk)``;
    ``group`` is a moe-ep ``Group`` or a torch process group (``None``: the world).
    """

    def __init__(self, group=None, num_max_dispatch_tokens_per_rank=128, hidden=7168, num_experts=256, num_topk=8):
        if not isinstance(group, Group):
            group = group_from_torch(group)
        self.group = group
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.hidden = hidden
        self.num_experts = num_experts
        self._ll = _moe_ep.LowLatencyBuffer(group, num_experts, hidden, num_topk, num_max_dispatch_tokens_per_rank)

    @staticmethod
    def _stream():
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
        ``return_recv_hook``) runs the receive half. Differences from DeepEP: pass
        ``topk_weights`` here for the pre-reduced combine; ``column_major_scales`` gives
        DeepGEMM's TMA-aligned scale layout.
        """
        import torch

        self._check_shape(num_max_dispatch_tokens_per_rank, num_experts)
        fmt = "ue8m0" if use_ue8m0 else ("f32_pow2" if round_scale else "f32")
        h = self._ll.dispatch(self._stream(), x, topk_idx, topk_weights, use_fp8, fmt, column_major_scales, return_recv_hook)
        hook = None
        if return_recv_hook:

            def hook():
                self._ll.dispatch_recv(self._stream(), h)

        rx, sc, count, _src = self._ll.recv_views(h)
        rx = torch.from_dlpack(rx)
        if use_fp8:
            recv_x = (rx.view(torch.float8_e4m3fn), torch.from_dlpack(sc))
        else:
            recv_x = rx
        event = _event() if async_finish else EventOverlap()
        return recv_x, torch.from_dlpack(count), h, event, hook

    def low_latency_combine(
        self, x, topk_idx, topk_weights, handle, zero_copy=False, async_finish=False, return_recv_hook=False, out=None, pre_reduced=False
    ):
        """Brings expert outputs ``x`` (bf16 ``[E_local, R * T, hidden]``) back and sums them per
        token into ``out`` (allocated when None). ``pre_reduced``: each expert rank sums its own
        slots first (about half the bytes; uses the weights the dispatch carried, so pass
        ``topk_weights=None``). ``zero_copy``: ``x`` was written into ``get_next_low_latency_combine_buffer``.
        Returns ``(combined_x, event, hook)``; the receive hook of the combine is not bound yet
        (``return_recv_hook=True`` raises ``InvalidArgument``)."""
        import torch

        if return_recv_hook:
            raise _invalid("return_recv_hook", "the combine's receive hook is not bound in this version")
        if out is None:
            out = torch.empty((topk_idx.shape[0], self.hidden), dtype=torch.bfloat16, device=topk_idx.device)
        self._ll.combine(self._stream(), handle, None if zero_copy else x, topk_idx, out, None if pre_reduced else topk_weights, pre_reduced)
        event = _event() if async_finish else EventOverlap()
        return out, event, None

    def get_next_low_latency_combine_buffer(self, handle):
        """The zero-copy combine input of ``handle`` (bf16 ``[E_local, R * T, hidden]``)."""
        import torch

        return torch.from_dlpack(self._ll.combine_input(handle))

    def _check_shape(self, tokens, experts):
        if tokens is not None and tokens != self.num_max_dispatch_tokens_per_rank:
            raise _invalid("num_max_dispatch_tokens_per_rank", f"{tokens}, but this buffer was built for {self.num_max_dispatch_tokens_per_rank}")
        if experts is not None and experts != self.num_experts:
            raise _invalid("num_experts", f"{experts}, but this buffer was built for {self.num_experts}")
