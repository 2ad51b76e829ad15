"""A process that ends without cleaning up exits cleanly: every rank builds a ``moe_ep.Buffer``
and a ``moe_ep.deep_ep.Buffer``, runs low-latency dispatches and combines through both (holding
a handle and the received views to the end), then destroys the process group and returns
without destroying a buffer, the ranks leaving seconds apart (rank 0 last, still at work while
the others go). The shapes and the object graph are ``examples/overhead.py``'s, whose end
crashed rank 1 at b6623af (the objects are freed with ``main()``'s frame; with
``MOE_EP_EXIT_RETURN=1`` the first run's way: most of them returned and freed after it). Every process must exit with status 0: no crash in the buffers', views' or
group's teardown, whatever order the interpreter frees them in.

    torchrun --nproc-per-node N python/tests/test_exit.py
"""

import faulthandler
import os
import time

import torch
import torch.distributed as dist

import moe_ep
import moe_ep.deep_ep as deep_ep

# DeepSeek-V3's decode shape, as overhead.py (whose end crashed once at b6623af).
HIDDEN, EXPERTS, TOPK, TOKENS = 7168, 256, 8, 128


def main():
    faulthandler.enable()
    dist.init_process_group(moe_ep.dist_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(moe_ep.local_device())
    experts = (EXPERTS + world - 1) // world * world
    buf = moe_ep.Buffer(None, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=TOKENS)
    dbuf = deep_ep.Buffer(buf.group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, HIDDEN, world, experts), low_latency_mode=True)
    x = torch.randn(TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    idx = torch.rand(TOKENS, experts, device="cuda").topk(TOPK, dim=1).indices.to(torch.int64)
    w = torch.rand(TOKENS, TOPK, device="cuda")
    y = torch.randn(experts // world, world * TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    for _ in range(3):
        recv, _, h, _, _ = buf.low_latency_dispatch(x, idx, topk_weights=w)
        out, _, _ = buf.low_latency_combine(y, idx, None, h, pre_reduced=True)
        drecv, dcount, dh, _, _ = dbuf.low_latency_dispatch(x, idx, TOKENS, experts)
        dout, _, _ = dbuf.low_latency_combine(y, idx, w, dh)
    # overhead.py's object graph: the extension's own calls through closures, the deep_ep part
    # and its view cache held in locals that closures capture (so that the frame frees them
    # in cell order, after the Buffer objects).
    dll, _, dviews = dbuf._ll_state
    make_views = deep_ep._make_ll_views

    def ext_dispatch():
        return dll.deep_ep_dispatch(torch.cuda.current_stream().cuda_stream, x, idx, TOKENS, experts, True, "f32", False, None, dviews, make_views)[2]

    for _ in range(3):
        last = ext_dispatch()
        dll.combine(torch.cuda.current_stream().cuda_stream, last, y, idx, out, w, False, False)
    torch.cuda.synchronize()
    assert buf.group.failure() is None, f"rank {rank}: {buf.group.failure()}"
    print(f"rank {rank} of {world} ({torch.cuda.get_device_name()}): steps done, leaving without destroy", flush=True)
    if rank == 0:
        # Still at work (host only) while the others tear down, as overhead.py's rank 0 is.
        time.sleep(3)
    dist.destroy_process_group()
    if os.environ.get("MOE_EP_EXIT_RETURN") == "1":
        return recv, out, drecv, dcount, dh, dout


if __name__ == "__main__":
    main()
    print("exiting", flush=True)
