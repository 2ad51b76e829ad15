"""The Python binding's cost per low-latency call, under torchrun:

    torchrun --nproc-per-node N python/examples/overhead.py

DeepEP's decode shape (128 tokens per rank, hidden 7168, top-8 of 256, FP8 dispatch, BF16
combine). For `low_latency_dispatch` and `low_latency_combine` it prints the median host time of
a call (what the binding adds on the CPU: tensor checks, DLPack views, the launch) and the median
GPU time between CUDA events around the call (the same definition as `moe-ep-bench ll`, whose
figures in the same run the binding's GPU times should match within about 2 us).
"""

import os
import statistics
import time

import torch
import torch.distributed as dist

import moe_ep

HIDDEN, EXPERTS, TOPK, TOKENS, ITERS = 7168, 256, 8, 128, 200


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    experts = (EXPERTS + world - 1) // world * world
    buf = moe_ep.Buffer(None, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=TOKENS)
    x = torch.randn(TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    idx = torch.rand(TOKENS, experts, device="cuda").topk(TOPK, dim=1).indices.to(torch.int64)
    w = torch.rand(TOKENS, TOPK, device="cuda")
    epr = experts // world
    y = torch.randn(epr, world * TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    host = {"dispatch": [], "combine": []}
    gpu = {"dispatch": [], "combine": []}
    for it in range(ITERS + 20):
        for op in ("dispatch", "combine"):
            dist.barrier()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            if op == "dispatch":
                _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, topk_weights=w)
            else:
                buf.low_latency_combine(y, idx, None, handle, pre_reduced=True)
            t1 = time.perf_counter()
            b.record()
            b.synchronize()
            if it >= 20:
                host[op].append((t1 - t0) * 1e6)
                gpu[op].append(a.elapsed_time(b) * 1e3)
    name = torch.cuda.get_device_name()
    for op in ("dispatch", "combine"):
        print(
            f"rank {rank} of {world} ({name}): low_latency_{op}: host {statistics.median(host[op]):.1f} us per call, "
            f"GPU {statistics.median(gpu[op]):.1f} us (median of {ITERS})"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
