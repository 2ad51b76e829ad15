"""Fast failure in Python: a rank's process is killed mid-decode, and every survivor learns of it
within 1 s, from an exception or from ``Group.failure()``, and never uses wrong rows.

    torchrun --monitor-interval 30 --nproc-per-node N python/tests/test_kill.py

(``--monitor-interval`` keeps torchrun's agent from stopping the survivors as soon as it sees the
killed rank; with ``MOE_EP_SHARE_GPU=1`` every rank is on GPU 0 under CUDA MPS.) Each decode
step is a low-latency dispatch of BF16 tokens and a pre-reduced combine of the received rows
(identity experts), checked against ``x * sum(weights)``. After a few good steps every rank
meets at a barrier and the last rank kills itself with SIGKILL. Each survivor then keeps
stepping: a step either raises a ``moe_ep`` exception, or finishes and ``Group.failure()`` (a
read of host memory) says whether its outputs can be used; a step whose outputs are wrong while
``failure()`` says nothing fails the test. Each survivor prints one ``PASS`` line (with how long
the news took) or an ``FAIL`` line, and ends without touching the dead rank's process group.
"""

import os
import signal
import time

import torch
import torch.distributed as dist

import moe_ep

HIDDEN, EXPERTS, TOPK, TOKENS, GOOD_STEPS = 1024, 64, 8, 32, 4
NOTICE_S = 1.0


def main():
    dist.init_process_group(moe_ep.dist_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(moe_ep.local_device())
    experts = (EXPERTS + world - 1) // world * world
    victim = world - 1
    buf = moe_ep.Buffer(None, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=TOKENS)
    gen = torch.Generator(device="cpu").manual_seed(4321 + rank)

    def step():
        """One decode step; its output and what it must be."""
        x = (torch.randn(TOKENS, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16).cuda()
        idx = torch.rand(TOKENS, experts, generator=gen).topk(TOPK, dim=1).indices.to(torch.int64).cuda()
        w = torch.rand(TOKENS, TOPK, generator=gen).cuda()
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, topk_weights=w, use_fp8=False)
        out, _, _ = buf.low_latency_combine(recv_x.clone(), idx, w, handle, pre_reduced=True)
        return out, x.float() * w.sum(1, keepdim=True)

    def wrong(out, ref):
        err = (out.float() - ref).abs().max().item()
        return not err <= 0.02 * ref.abs().max().item() + 1e-2

    for i in range(GOOD_STEPS):
        out, ref = step()
        torch.cuda.synchronize()
        assert buf.group.failure() is None, f"rank {rank}: step {i} failed: {buf.group.failure()}"
        assert not wrong(out, ref), f"rank {rank}: step {i} differs with every rank alive"
    dist.barrier()
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    verdict, how = None, None
    for i in range(10_000):
        try:
            out, ref = step()
            torch.cuda.synchronize()
        except moe_ep.MoeEpError as e:
            how = f"step {i} raised {type(e).__name__}: {e}"
            break
        cause = buf.group.failure()
        if cause is not None:
            how = f"Group.failure() after step {i}: {cause}"
            break
        if wrong(out, ref):
            verdict = f"FAIL rank {rank}: step {i} returned wrong rows and Group.failure() said nothing"
            break
        if time.monotonic() - t0 > 10:
            verdict = f"FAIL rank {rank}: {i + 1} steps in 10 s and no sign of rank {victim}'s death"
            break
    took = time.monotonic() - t0
    if verdict is None and took > NOTICE_S:
        verdict = f"FAIL rank {rank}: rank {victim}'s death took {took:.3f} s to surface ({how})"
    if verdict is None and f"rank {victim}" not in how:
        verdict = f"FAIL rank {rank}: the failure does not name rank {victim}: {how}"
    if verdict is None:
        # Every later call is refused, before it launches anything.
        try:
            step()
            verdict = f"FAIL rank {rank}: a step after the failure was accepted"
        except moe_ep.MoeEpError as e:
            verdict = f"PASS rank {rank}: learned of rank {victim}'s death in {took * 1e3:.1f} ms ({how}); the next step raised {type(e).__name__}"
    print(verdict, flush=True)
    # The dead rank's process group cannot be destroyed; leave without it.
    os._exit(0 if verdict.startswith("PASS") else 1)


if __name__ == "__main__":
    main()
