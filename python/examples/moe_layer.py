"""A small MoE layer on moe_ep, end to end, under torchrun (one process per GPU):

    torchrun --nproc-per-node N python/examples/moe_layer.py

Router (a linear layer and a softmax), top-k, the high-throughput dispatch for a prefill batch
and the low-latency dispatch for a decode batch, two grouped-GEMM placeholders per local expert
(up and down projections, one `torch.matmul` per expert), the combine. Each rank checks its
output against the same layer computed densely on its own tokens (every expert's weights are
generated from the seed on every rank) and prints the largest difference.
"""

import torch
import torch.distributed as dist

import moe_ep

HIDDEN, FFN, EXPERTS, TOPK = 1024, 512, 32, 4


def expert_weights(e):
    g = torch.Generator(device="cpu").manual_seed(100 + e)
    up = torch.randn(HIDDEN, FFN, generator=g) / HIDDEN**0.5
    down = torch.randn(FFN, HIDDEN, generator=g) / FFN**0.5
    return up.to(torch.bfloat16).cuda(), down.to(torch.bfloat16).cuda()


def expert_fn(w, rows):
    up, down = w
    return torch.relu(rows @ up) @ down


def route(router, x):
    probs = torch.softmax((x.float() @ router), dim=1)
    w, idx = probs.topk(TOPK, dim=1)
    return idx.to(torch.int64), (w / w.sum(1, keepdim=True)).float()


def dense(x, idx, w, weights):
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float32, device=x.device)
    for k in range(TOPK):
        for e in idx[:, k].unique().tolist():
            m = idx[:, k] == e
            out[m] += w[m, k : k + 1] * expert_fn(weights[e], x[m]).float()
    return out.to(torch.bfloat16)


def main():
    dist.init_process_group(moe_ep.dist_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(moe_ep.local_device())
    experts = (EXPERTS + world - 1) // world * world
    epr = experts // world
    weights = [expert_weights(e) for e in range(experts)]
    router = torch.randn(HIDDEN, experts, generator=torch.Generator(device="cpu").manual_seed(7)).cuda() / HIDDEN**0.5
    buf = moe_ep.Buffer(None, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=64, num_max_tokens_per_rank=512)
    g = torch.Generator(device="cpu").manual_seed(rank)

    # Prefill: high-throughput.
    x = torch.randn(512, HIDDEN, generator=g).to(torch.bfloat16).cuda()
    idx, w = route(router, x)
    _, _, _, in_rank, _ = buf.get_dispatch_layout(idx, experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, is_token_in_rank=in_rank)
    y = torch.zeros_like(recv_x, dtype=torch.float32)
    for j in range(epr):
        for k in range(TOPK):
            m = recv_idx[:, k] == j
            if m.any():
                y[m] += recv_w[m, k : k + 1] * expert_fn(weights[rank * epr + j], recv_x[m]).float()
    out, _, _ = buf.combine(y.to(torch.bfloat16), handle)
    ref = dense(x, idx, w, weights)
    err = (out.float() - ref.float()).abs().max().item()
    print(f"rank {rank} of {world} ({torch.cuda.get_device_name()}): prefill 512 tokens, {recv_x.shape[0]} rows received, max |out - dense| = {err:.3g}")

    # Decode: low-latency, pre-reduced combine.
    x = torch.randn(64, HIDDEN, generator=g).to(torch.bfloat16).cuda()
    idx, w = route(router, x)
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, idx, use_fp8=False, topk_weights=w)
    y = torch.zeros_like(recv_x)
    for j in range(epr):
        n = int(recv_count[j])
        if n:
            y[j, :n] = expert_fn(weights[rank * epr + j], recv_x[j, :n])
    out, _, _ = buf.low_latency_combine(y, idx, None, handle, pre_reduced=True)
    ref = dense(x, idx, w, weights)
    err = (out.float() - ref.float()).abs().max().item()
    print(f"rank {rank}: decode 64 tokens, max |out - dense| = {err:.3g}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
