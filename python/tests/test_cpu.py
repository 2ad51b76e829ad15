"""CPU checks of the moe_ep wheel (CI, no GPU, no torch): it imports, its errors form one
hierarchy with fields, it says clearly that there is no GPU, and the tensor check every entry
point runs refuses bad tensors (wrong dtype, device, shape, contiguity, not a tensor) with a
message naming the argument, what was expected and what was given. Stand-in tensors expose
the attributes the extension reads from torch tensors."""

import sys

import moe_ep
from moe_ep import _moe_ep


class Device:
    def __init__(self, type, index):
        self.type, self.index = type, index

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"


class Dtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


class FakeTensor:
    def __init__(self, shape, dtype="torch.bfloat16", device=("cuda", 0), contiguous=True):
        self.shape = tuple(shape)
        self.dtype = Dtype(dtype)
        self.device = Device(*device)
        self._contiguous = contiguous

    @property
    def is_cuda(self):
        return self.device.type == "cuda"

    def get_device(self):
        return -1 if self.device.index is None else self.device.index

    def data_ptr(self):
        return 0x7F0000000000

    def is_contiguous(self):
        return self._contiguous


def refused(t, needle, name="x", dtypes=("torch.bfloat16",), shape=(None, 7168)):
    try:
        moe_ep.check_tensor(name, t, list(dtypes), list(shape), 0)
    except moe_ep.InvalidArgument as e:
        msg = str(e)
        assert e.argument == name and e.kind == "InvalidArgument", (e.argument, e.kind)
        assert needle in msg, f"{needle!r} not in {msg!r}"
        return msg
    raise AssertionError(f"{t} was accepted")


def main():
    assert moe_ep.__version__
    for cls in (moe_ep.InvalidArgument, moe_ep.NoDevice, moe_ep.Timeout, moe_ep.PeerFailed, moe_ep.GroupFailed):
        assert issubclass(cls, moe_ep.MoeEpError) and issubclass(cls, RuntimeError), cls
    # Without a GPU: a clear error of its own type.
    try:
        n = moe_ep.device_count()
        print(f"device_count() = {n} (a driver is present)")
    except moe_ep.NoDevice as e:
        assert "no GPU available" in str(e), str(e)
        print(f"device_count(): NoDevice: {e}")
    # The check every entry point runs (without torch, through the tensors' attributes).
    path = moe_ep.tensor_path()
    assert path.startswith("tensor attributes"), path
    print(f"tensor_path(): {path}")
    moe_ep.check_tensor("x", FakeTensor((4, 7168)), ["torch.bfloat16"], [None, 7168], 0)
    print(refused(FakeTensor((4, 7168), dtype="torch.float32"), "got a torch.float32 tensor of shape [4, 7168] on cuda:0"))
    print(refused(FakeTensor((4, 7168), device=("cpu", None)), "shape [4, 7168] on cpu"))
    print(refused(FakeTensor((4, 7168), device=("cuda", 1)), "on cuda:1"))
    print(refused(FakeTensor((4, 4096)), "expected a contiguous torch.bfloat16 tensor of shape [*, 7168] on cuda:0"))
    print(refused(FakeTensor((4, 7168, 1)), "shape [4, 7168, 1]"))
    print(refused(FakeTensor((4, 7168), contiguous=False), "non-contiguous"))
    print(refused([1, 2, 3], "expected a torch tensor, got list"))
    print(refused(FakeTensor((4, 8), dtype="torch.int32"), "torch.int64", name="topk_idx", dtypes=("torch.int64",), shape=(4, None)))
    # Python-side argument checks carry the same fields.
    e = moe_ep._invalid("num_experts", "3, but this buffer was built for 256")
    assert isinstance(e, moe_ep.InvalidArgument) and e.argument == "num_experts"
    # A group needs a GPU: without one, NoDevice (never a crash).
    try:
        moe_ep.Group(0, 2, 0, lambda b: [b, b])
        print("Group built (a GPU is present)")
    except moe_ep.NoDevice as e:
        print(f"Group(...): NoDevice: {e}")
    assert all(hasattr(_moe_ep, c) for c in ("LowLatencyBuffer", "HighThroughputBuffer", "HighThroughputLayout")) and hasattr(moe_ep, "Buffer")
    # The tensor fast path is taken only on the torch versions its layout is proven on.
    for v, proven in (("2.11.0", True), ("2.11.0+cu130", True), ("2.12.0a0+git1234", True), ("3.0.1", True), ("2.10.1+cu128", False), ("2.9.0", False), ("1.13.1", False), ("", False), ("nightly", False)):
        assert _moe_ep._shim_layout_proven(v) == proven, (v, proven)
    # The rendezvous over moe-ep's own TCP (the peer watch): without a GPU, NoDevice too.
    try:
        moe_ep.Group.connect(0, 1, 0, "127.0.0.1", 1, "secret")
        print("Group.connect built (a GPU is present)")
    except moe_ep.NoDevice as e:
        print(f"Group.connect(...): NoDevice: {e}")
    # Ranks sharing a GPU: the opt-in and what it chooses.
    import os

    os.environ["MOE_EP_SHARE_GPU"] = "1"
    assert moe_ep.shares_gpu() and moe_ep.dist_backend() == "gloo" and moe_ep.local_device() == 0
    os.environ["MOE_EP_SHARE_GPU"] = "0"
    os.environ["LOCAL_RANK"] = "3"
    assert not moe_ep.shares_gpu() and moe_ep.dist_backend() == "nccl" and moe_ep.local_device() == 3
    os.environ["MOE_EP_SHARE_GPU"] = "maybe"
    try:
        moe_ep.shares_gpu()
        raise AssertionError("MOE_EP_SHARE_GPU=maybe was accepted")
    except moe_ep.InvalidArgument as e:
        assert e.argument == "MOE_EP_SHARE_GPU", e.argument
    os.environ["MOE_EP_SHARE_GPU"] = "0"
    # Where rank 0 of a Python group listens.
    for k in ("MOE_EP_MASTER_ADDR", "MASTER_ADDR"):
        os.environ.pop(k, None)
    assert moe_ep._rendezvous_addr(["a", "a"], 0) == "127.0.0.1"
    os.environ["MASTER_ADDR"] = "10.1.2.3"
    assert moe_ep._rendezvous_addr(["a", "b"], 0) == "10.1.2.3"
    os.environ["MOE_EP_MASTER_ADDR"] = "10.9.9.9"
    assert moe_ep._rendezvous_addr(["a", "b"], 4) == "10.9.9.9"
    check_deep_ep_surface()
    # The low-latency transport: the default, the environment's, an explicit one.
    import os

    saved = os.environ.pop("MOE_EP_LL_TRANSPORT", None)
    assert moe_ep.ll_transport() == "ipc", moe_ep.ll_transport()
    os.environ["MOE_EP_LL_TRANSPORT"] = "nvshmem"
    assert moe_ep.ll_transport() == "nvshmem" and moe_ep.ll_transport("ipc") == "ipc"
    del os.environ["MOE_EP_LL_TRANSPORT"]
    if saved is not None:
        os.environ["MOE_EP_LL_TRANSPORT"] = saved
    assert moe_ep.nvshmem_status() is None
    # The test wheel carries no NVSHMEM module (the release wheel does); `none` switches it off.
    saved = os.environ.pop("MOE_EP_NVSHMEM_MODULE", None)
    assert moe_ep.nvshmem_module().startswith("none (the wheel carries no NVSHMEM module"), moe_ep.nvshmem_module()
    os.environ["MOE_EP_NVSHMEM_MODULE"] = "none"
    assert moe_ep.nvshmem_module() == "none (MOE_EP_NVSHMEM_MODULE=none)", moe_ep.nvshmem_module()
    os.environ["MOE_EP_NVSHMEM_MODULE"] = "/x/m.cubin"
    assert moe_ep.nvshmem_module() == "/x/m.cubin (MOE_EP_NVSHMEM_MODULE)", moe_ep.nvshmem_module()
    del os.environ["MOE_EP_NVSHMEM_MODULE"]
    if saved is not None:
        os.environ["MOE_EP_NVSHMEM_MODULE"] = saved
    print("moe_ep CPU checks passed")


# DeepEP's public API as vLLM and SGLang call it (../shared/ENGINES.md): every name, and the
# parameters of every call, in DeepEP's order.
DEEP_EP_SIGNATURES = {
    "Buffer.__init__": "self group num_nvl_bytes num_rdma_bytes low_latency_mode num_qps_per_rank allow_nvlink_for_low_latency_mode allow_mnnvl explicitly_destroy enable_shrink comm",
    "Buffer.get_dispatch_layout": "self topk_idx num_experts previous_event async_finish allocate_on_comm_stream",
    "Buffer.dispatch": "self x handle num_tokens_per_rank num_tokens_per_rdma_rank is_token_in_rank num_tokens_per_expert topk_idx topk_weights expert_alignment num_worst_tokens config previous_event async_finish allocate_on_comm_stream",
    "Buffer.combine": "self x handle topk_weights bias config previous_event async_finish allocate_on_comm_stream",
    "Buffer.low_latency_dispatch": "self x topk_idx num_max_dispatch_tokens_per_rank num_experts cumulative_local_expert_recv_stats dispatch_wait_recv_cost_stats use_fp8 round_scale use_ue8m0 async_finish return_recv_hook",
    "Buffer.low_latency_combine": "self x topk_idx topk_weights handle use_logfmt zero_copy async_finish return_recv_hook out combine_wait_recv_cost_stats",
    "Buffer.get_next_low_latency_combine_buffer": "self handle",
    "Buffer.clean_low_latency_buffer": "self num_max_dispatch_tokens_per_rank hidden num_experts",
    "Buffer.get_low_latency_rdma_size_hint": "num_max_dispatch_tokens_per_rank hidden num_ranks num_experts",
    "Buffer.get_dispatch_config": "num_ranks",
    "Buffer.get_combine_config": "num_ranks",
    "Buffer.set_num_sms": "new_num_sms",
    "Buffer.capture": "",
    "Buffer.destroy": "self",
    "Buffer.get_comm_stream": "self",
    "Buffer.get_local_buffer_tensor": "self dtype size offset use_rdma_buffer",
    "Config.__init__": "self num_sms num_max_nvl_chunked_send_tokens num_max_nvl_chunked_recv_tokens num_max_rdma_chunked_send_tokens num_max_rdma_chunked_recv_tokens",
    "Config.get_nvl_buffer_size_hint": "self hidden_bytes num_ranks",
    "Config.get_rdma_buffer_size_hint": "self hidden_bytes num_ranks",
    "EventOverlap": "event extra_tensors",
    "EventOverlap.current_stream_wait": "self",
}


def check_deep_ep_surface():
    """moe_ep.deep_ep without a GPU (and without torch): names, signatures, what it refuses."""
    import inspect

    import moe_ep.deep_ep as deep_ep

    for name in ("Buffer", "Config", "EventOverlap", "topk_idx_t", "install"):
        assert hasattr(deep_ep, name), name
    for path, params in DEEP_EP_SIGNATURES.items():
        # A class of the extension (EventOverlap) carries its constructor's signature itself.
        obj = deep_ep
        for part in path.split("."):
            obj = getattr(obj, part)
        got = " ".join(inspect.signature(obj).parameters)
        assert got == params, f"deep_ep.{path}({got}) differs from DeepEP's ({params})"
    assert deep_ep.Buffer.num_sms == 20 and deep_ep.Buffer.is_sm90_compiled()
    # `import deep_ep` finds this module after one line.
    deep_ep.install()
    import deep_ep as aliased

    assert aliased is deep_ep
    # Size hints (and their checks) need no GPU.
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) > 0
    assert deep_ep.Config(24).get_nvl_buffer_size_hint(7168 * 2, 8) > 0 and deep_ep.Config().get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    cfg = deep_ep.Buffer.get_dispatch_config(8)
    assert cfg.num_sms == deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7000, 8, 256)
        raise AssertionError("hidden 7000 was accepted")
    except moe_ep.InvalidArgument as e:
        assert e.argument == "hidden", e.argument
    try:
        deep_ep.Buffer.set_num_sms(1)
        raise AssertionError("1 SM was accepted")
    except moe_ep.InvalidArgument as e:
        assert e.argument == "new_num_sms", e.argument
    deep_ep.Buffer.set_num_sms(24)
    assert deep_ep.Buffer.num_sms == 24
    deep_ep.Buffer.set_num_sms(20)
    # What cannot be done here is a NotImplementedError naming the argument, never a TypeError.
    refusals = [
        (lambda: deep_ep.Buffer(None, enable_shrink=True), "enable_shrink"),
        (lambda: deep_ep.Buffer(None, comm=object()), "comm"),
        (lambda: deep_ep.Buffer(None, allow_nvlink_for_low_latency_mode=False), "allow_nvlink_for_low_latency_mode"),
    ]
    b = deep_ep.Buffer.__new__(deep_ep.Buffer)  # no __init__: only the argument checks run
    refusals += [
        (lambda: b.low_latency_combine(None, None, None, None, use_logfmt=True), "use_logfmt"),
        (lambda: b.low_latency_combine(None, None, None, None, combine_wait_recv_cost_stats=object()), "combine_wait_recv_cost_stats"),
        (lambda: b.low_latency_dispatch(None, None, 128, 256, dispatch_wait_recv_cost_stats=object()), "dispatch_wait_recv_cost_stats"),
        (lambda: b.dispatch(None, num_tokens_per_rdma_rank=object()), "num_tokens_per_rdma_rank"),
        (lambda: b.get_local_buffer_tensor(None), "get_local_buffer_tensor"),
        (lambda: b.low_latency_update_mask_buffer(0), "enable_shrink"),
        (lambda: b.low_latency_query_mask_buffer(None), "enable_shrink"),
        (lambda: b.low_latency_clean_mask_buffer(), "enable_shrink"),
    ]
    for call, name in refusals:
        try:
            call()
            raise AssertionError(f"{name}: accepted")
        except NotImplementedError as e:
            assert f"`{name}`" in str(e), str(e)
    print(f"moe_ep.deep_ep: {len(DEEP_EP_SIGNATURES)} signatures as DeepEP's, {len(refusals)} refusals named")


if __name__ == "__main__":
    sys.exit(main())
