"""GPU check of the moe_ep package under torchrun (one process per GPU):

    torchrun --nproc-per-node N python/tests/test_gpu.py

Low-latency dispatch (BF16 and FP8) and both combine modes against a torch reference built from
every rank's inputs (all-gathered): the received rows of every local expert (as sets keyed by
source rank, token and slot, BF16 bit for bit), the counts, and the combined output (expert
outputs are `x * (1 + e % 7 / 8)`; compared with a tolerance of bf16 rounding).
"""

import os

import torch
import torch.distributed as dist

import moe_ep

HIDDEN, EXPERTS, TOPK, TOKENS = 2048, 64, 8, 64


def expert_factor(e):
    return 1.0 + (e % 7) / 8.0


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    experts = (EXPERTS + world - 1) // world * world
    epr = experts // world
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = (torch.randn(TOKENS, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    scores = torch.rand(TOKENS, experts, generator=gen)
    topk_idx = scores.topk(TOPK, dim=1).indices.to(torch.int64).cuda()
    topk_w = torch.rand(TOKENS, TOPK, generator=gen).cuda()

    # Every rank's inputs, for the reference.
    xs, idxs, ws = ([torch.empty_like(t) for _ in range(world)] for t in (x, topk_idx, topk_w))
    dist.all_gather(xs, x)
    dist.all_gather(idxs, topk_idx)
    dist.all_gather(ws, topk_w)

    buf = moe_ep.Buffer(None, num_max_dispatch_tokens_per_rank=TOKENS, hidden=HIDDEN, num_experts=experts, num_topk=TOPK)
    print(f"rank {rank} of {world} ({torch.cuda.get_device_name()}): moe_ep {moe_ep.__version__}")

    for use_fp8 in (False, True):
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, topk_weights=topk_w, use_fp8=use_fp8)
        torch.cuda.synchronize()
        rows = recv_x[0] if use_fp8 else recv_x
        src = torch.from_dlpack(buf._ll.recv_views(handle)[3]).cpu()
        count = count.cpu()
        for e in range(epr):
            ge = rank * epr + e
            want = {}
            for s in range(world):
                hits = (idxs[s] == ge).nonzero().cpu()
                for t, k in hits.tolist():
                    want[(s, t, k)] = xs[s][t]
            assert int(count[e]) == len(want), f"rank {rank} expert {e}: {int(count[e])} rows, expected {len(want)}"
            for j in range(int(count[e])):
                m = int(src[e, j]) & 0xFFFFFFFF
                key = (m >> 24, m & 0xFFFF, (m >> 16) & 0xFF)
                assert key in want, f"rank {rank} expert {e} row {j}: unexpected source {key}"
                if not use_fp8:
                    assert torch.equal(rows[e, j], want.pop(key)), f"rank {rank} expert {e} row {j}: BF16 row differs"
                else:
                    want.pop(key)
            assert not want, f"rank {rank} expert {e}: {len(want)} rows missing"
        # Expert outputs: the received rows times a per-expert factor (BF16 dispatch only).
        if not use_fp8:
            y = torch.zeros_like(rows)
            for e in range(epr):
                y[e] = (rows[e].float() * expert_factor(rank * epr + e)).to(torch.bfloat16)
            ref = torch.zeros(TOKENS, HIDDEN, dtype=torch.float32, device=x.device)
            for k in range(TOPK):
                f = torch.tensor([expert_factor(int(e)) for e in topk_idx[:, k].tolist()], device=x.device)
                ref += topk_w[:, k : k + 1] * (x.float() * f[:, None]).to(torch.bfloat16).float()
            for pre in (False, True):
                out, _, _ = buf.low_latency_combine(y, topk_idx, topk_w, handle, pre_reduced=pre)
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                tol = 0.02 * ref.abs().max().item() + 1e-2
                assert err <= tol, f"rank {rank}: combine (pre_reduced={pre}) differs by {err} (tolerance {tol})"
                print(f"rank {rank}: combine pre_reduced={pre} max |out - ref| = {err:.4g} (tolerance {tol:.3g})")
        print(f"rank {rank}: dispatch use_fp8={use_fp8}: every received row and count match")

    # Bad input is refused before anything launches.
    try:
        buf.low_latency_dispatch(x.float(), topk_idx)
        raise AssertionError("a float32 x was accepted")
    except moe_ep.InvalidArgument as e:
        assert e.argument == "x", e.argument
    dist.barrier()
    print(f"rank {rank}: moe_ep GPU checks passed")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
