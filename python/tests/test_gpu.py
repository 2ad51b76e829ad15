"""GPU check of the moe_ep package under torchrun (one process per GPU, or with
``MOE_EP_SHARE_GPU=1`` every rank on GPU 0 under CUDA MPS; with ``MOE_EP_LL_TRANSPORT=nvshmem``
the low-latency buffer lives in NVSHMEM's symmetric memory; with ``MOE_EP_TEST_NODE_SIZE=N`` every
N ranks stand for one node, so that the ranks span nodes: the low-latency buffer then goes to
NVSHMEM by default and the high-throughput one and moe-ep's own heap must be refused):

    torchrun --nproc-per-node N python/tests/test_gpu.py

Against a torch reference built from every rank's inputs (all-gathered):
- low-latency dispatch (BF16 and FP8) and both combine modes: the received rows of every local
  expert (as sets keyed by source rank, token and slot, BF16 bit for bit), the counts, and the
  combined output (expert outputs `x * (1 + e % 7 / 8)`; a tolerance of bf16 rounding); the
  same in hook mode (send and receive halves apart, outputs poisoned with NaN first); a decode
  step captured with `torch.cuda.graph` and replayed on new tokens, routing and weights;
- high-throughput layout, dispatch (rows in (source rank, token) order, bit for bit), cached
  dispatch and combine with identity experts (bit for bit).
"""

import gc
import os
import torch
import torch.distributed as dist

import moe_ep

HIDDEN, EXPERTS, TOPK, TOKENS = 2048, 64, 8, 64


def expert_factor(e):
    return 1.0 + (e % 7) / 8.0


def all_gather(t):
    """Every rank's ``t``, on this rank's GPU (through the CPU where the backend is gloo, on a
    shared GPU)."""
    world = dist.get_world_size()
    if dist.get_backend() == "gloo":
        out = [torch.empty_like(t, device="cpu") for _ in range(world)]
        dist.all_gather(out, t.cpu())
        return [o.to(t.device) for o in out]
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return out


def main():
    node_size = int(os.environ.get("MOE_EP_TEST_NODE_SIZE", "0"))
    if node_size:
        # Before the group is made: every node_size ranks stand for one node.
        os.environ["MOE_EP_NODE"] = f"test-node-{int(os.environ['RANK']) // node_size}"
    dist.init_process_group(moe_ep.dist_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(moe_ep.local_device())
    experts = (EXPERTS + world - 1) // world * world
    epr = experts // world
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = (torch.randn(TOKENS, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    scores = torch.rand(TOKENS, experts, generator=gen)
    topk_idx = scores.topk(TOPK, dim=1).indices.to(torch.int64).cuda()
    topk_w = torch.rand(TOKENS, TOPK, generator=gen).cuda()

    # Every rank's inputs, for the reference.
    xs, idxs = all_gather(x), all_gather(topk_idx)

    buf = moe_ep.Buffer(None, num_max_dispatch_tokens_per_rank=TOKENS, hidden=HIDDEN, num_experts=experts, num_topk=TOPK)
    transport = moe_ep.ll_transport(None, buf.group)
    spans = buf.group.spans_nodes
    if node_size:
        assert buf.group.nodes == [r // node_size for r in range(world)], buf.group.nodes
        assert spans == (world > node_size), (spans, world, node_size)
    nv = moe_ep.nvshmem_status()
    assert (nv is not None) == (transport == "nvshmem"), (transport, nv)
    where = f", low-latency buffer in NVSHMEM {nv[0]}.{nv[1]}.{nv[2]}'s memory (init status {nv[3]})" if nv else ""
    put_ranks = buf._ll.put_ranks
    module = moe_ep.nvshmem_module()
    if transport == "nvshmem" and "MOE_EP_NVSHMEM_MODULE" not in os.environ:
        # The release wheel carries the NVSHMEM module (`cargo xtask wheel`).
        assert module.endswith("(carried by the wheel)"), module
    if os.environ.get("MOE_EP_NVSHMEM_PUT") == "all" and transport == "nvshmem":
        # Every other rank through NVSHMEM calls (the put path of the NVSHMEM module).
        assert put_ranks == [r for r in range(world) if r != rank], (put_ranks, rank, world)
    else:
        assert put_ranks == [], put_ranks
    if nv:
        where += f", other ranks reached {'through NVSHMEM calls (ranks ' + str(put_ranks) + ')' if put_ranks else 'by direct stores'}"
        where += f", NVSHMEM module: {module}"
    if spans:
        where += f", ranks on nodes {buf.group.nodes}"
    print(f"rank {rank} of {world} ({torch.cuda.get_device_name()}): moe_ep {moe_ep.__version__}{where}")

    def check_received(recv_x, count, handle, use_fp8, what, inputs=None):
        """Every local expert's received rows (as sets by source rank, token, slot; BF16 bit
        for bit) and counts."""
        all_x, all_idx = inputs if inputs is not None else (xs, idxs)
        rows = recv_x[0] if use_fp8 else recv_x
        src = torch.from_dlpack(buf._ll.recv_views(handle)[3]).cpu()
        count = count.cpu()
        for e in range(epr):
            ge = rank * epr + e
            want = {}
            for s in range(world):
                hits = (all_idx[s] == ge).nonzero().cpu()
                for t, k in hits.tolist():
                    want[(s, t, k)] = all_x[s][t]
            assert int(count[e]) == len(want), f"rank {rank} {what} expert {e}: {int(count[e])} rows, expected {len(want)}"
            for j in range(int(count[e])):
                m = int(src[e, j]) & 0xFFFFFFFF
                key = (m >> 24, m & 0xFFFF, (m >> 16) & 0xFF)
                assert key in want, f"rank {rank} {what} expert {e} row {j}: unexpected source {key}"
                if not use_fp8:
                    assert torch.equal(rows[e, j], want.pop(key)), f"rank {rank} {what} expert {e} row {j}: BF16 row differs"
                else:
                    want.pop(key)
            assert not want, f"rank {rank} {what} expert {e}: {len(want)} rows missing"

    factors = torch.tensor([expert_factor(rank * epr + e) for e in range(epr)], device="cuda")

    def experts_of(rows):
        """The expert outputs: each local expert's received rows times its factor."""
        return (rows.float() * factors[:, None, None]).to(torch.bfloat16)

    def combine_ref(x, topk_idx, topk_w):
        ref = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float32, device=x.device)
        for k in range(topk_idx.shape[1]):
            f = torch.tensor([expert_factor(int(e)) for e in topk_idx[:, k].tolist()], device=x.device)
            ref += topk_w[:, k : k + 1] * (x.float() * f[:, None]).to(torch.bfloat16).float()
        return ref

    def check_combined(out, ref, what):
        err = (out.float() - ref).abs().max().item()
        tol = 0.02 * ref.abs().max().item() + 1e-2
        assert err <= tol, f"rank {rank}: {what} differs by {err} (tolerance {tol})"
        print(f"rank {rank}: {what} max |out - ref| = {err:.4g} (tolerance {tol:.3g})")

    ref = combine_ref(x, topk_idx, topk_w)
    for use_fp8 in (False, True):
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, topk_weights=topk_w, use_fp8=use_fp8)
        torch.cuda.synchronize()
        check_received(recv_x, count, handle, use_fp8, "dispatch")
        # Expert outputs: the received rows times a per-expert factor (BF16 dispatch only).
        if not use_fp8:
            y = experts_of(recv_x)
            for pre in (False, True):
                out, _, _ = buf.low_latency_combine(y, topk_idx, topk_w, handle, pre_reduced=pre)
                torch.cuda.synchronize()
                check_combined(out, ref, f"combine pre_reduced={pre}")
        print(f"rank {rank}: dispatch use_fp8={use_fp8}: every received row and count match")

    # Hook mode: only the send halves run in the calls; the hooks run the receive halves. Fresh
    # inputs, so the buffer halves cannot already hold what the checks expect.
    for pre in (False, True):
        gh = torch.Generator(device="cpu").manual_seed(777 + 10 * int(pre) + rank)
        hx = (torch.randn(TOKENS, HIDDEN, generator=gh) * 0.5).to(torch.bfloat16).cuda()
        hidx = torch.rand(TOKENS, experts, generator=gh).topk(TOPK, dim=1).indices.to(torch.int64).cuda()
        hw = torch.rand(TOKENS, TOPK, generator=gh).cuda()
        hxs, hidxs = all_gather(hx), all_gather(hidx)
        recv_x, count, handle, _, hook = buf.low_latency_dispatch(hx, hidx, topk_weights=hw, use_fp8=False, return_recv_hook=True)
        hook()
        torch.cuda.synchronize()
        check_received(recv_x, count, handle, False, "hook dispatch", (hxs, hidxs))
        out = torch.full((TOKENS, HIDDEN), float("nan"), dtype=torch.bfloat16, device="cuda")
        _, _, chook = buf.low_latency_combine(experts_of(recv_x), hidx, hw, handle, out=out, pre_reduced=pre, return_recv_hook=True)
        chook()
        torch.cuda.synchronize()
        check_combined(out, combine_ref(hx, hidx, hw), f"hook combine pre_reduced={pre}")
        try:
            chook()
            raise AssertionError("a combine hook ran twice")
        except moe_ep.InvalidArgument as e:
            assert e.argument == "hook", e.argument

    # A decode step captured with torch.cuda.graph (dispatch, experts, pre-reduced combine),
    # replayed on new tokens, routing and weights written into the captured inputs.
    sx, sidx, sw = x.clone(), topk_idx.clone(), topk_w.clone()
    sout = torch.empty(TOKENS, HIDDEN, dtype=torch.bfloat16, device="cuda")

    def step():
        rx, _, h, _, _ = buf.low_latency_dispatch(sx, sidx, topk_weights=sw, use_fp8=False)
        buf.low_latency_combine(experts_of(rx), sidx, None, h, out=sout, pre_reduced=True)

    step()  # the eager step first (views made, nothing new inside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(3):
        g2 = torch.Generator(device="cpu").manual_seed(99 + 10 * replay + rank)
        sx.copy_((torch.randn(TOKENS, HIDDEN, generator=g2) * 0.5).to(torch.bfloat16))
        sidx.copy_(torch.rand(TOKENS, experts, generator=g2).topk(TOPK, dim=1).indices)
        sw.copy_(torch.rand(TOKENS, TOPK, generator=g2))
        sout.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_combined(sout, combine_ref(sx, sidx, sw), f"graph replay {replay} (dispatch + pre-reduced combine)")
    buf.group.check()

    if spans:
        # Across nodes the high-throughput kernels (CUDA IPC within a node) are refused.
        try:
            moe_ep.Buffer(None, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=0, num_max_tokens_per_rank=TOKENS)
            raise AssertionError("a high-throughput buffer across nodes was accepted")
        except moe_ep.InvalidArgument as e:
            assert e.argument == "group" and "other nodes" in str(e), (e.argument, str(e))
        print(f"rank {rank}: the high-throughput buffer was refused across nodes")
    else:
        # High-throughput: layout, dispatch, cached dispatch, combine.
        ht = moe_ep.Buffer(None, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=0, num_max_tokens_per_rank=TOKENS)
        tpr, _, tpe, in_rank, _ = ht.get_dispatch_layout(topk_idx, experts)
        ref_in_rank = torch.stack([((topk_idx // epr) == r).any(1) for r in range(world)], dim=1)
        assert torch.equal(in_rank, ref_in_rank), f"rank {rank}: is_token_in_rank differs"
        assert torch.equal(tpr.cpu(), ref_in_rank.sum(0).to(torch.int32).cpu()), f"rank {rank}: tokens per rank differ"
        ref_tpe = torch.bincount(topk_idx.flatten(), minlength=experts).to(torch.int32)
        assert torch.equal(tpe, ref_tpe), f"rank {rank}: tokens per expert differ"
        recv_x, recv_idx, recv_w, counts, handle, _ = ht.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, is_token_in_rank=in_rank)
        torch.cuda.synchronize()
        ref_rows = torch.cat([xs[s][((idxs[s] // epr) == rank).any(1)] for s in range(world)])
        assert torch.equal(recv_x, ref_rows), f"rank {rank}: high-throughput rows differ"
        assert sum(counts) >= 0 and recv_idx.shape == (ref_rows.shape[0], TOPK)
        y = recv_x.clone()
        out, _, _ = ht.combine(y, handle)
        torch.cuda.synchronize()
        ref_out = (x.float() * ref_in_rank.sum(1, keepdim=True).float()).to(torch.bfloat16)
        assert torch.equal(out, ref_out), f"rank {rank}: high-throughput combine (identity experts) differs"
        recv_x2, _, _, _, _, _ = ht.dispatch(x, handle=handle, topk_idx=topk_idx, topk_weights=topk_w)
        torch.cuda.synchronize()
        assert torch.equal(recv_x2, ref_rows), f"rank {rank}: cached dispatch rows differ"
        print(f"rank {rank}: high-throughput layout, dispatch ({ref_rows.shape[0]} rows), cached dispatch and combine match")

    # Bad input is refused before anything launches.
    try:
        buf.low_latency_dispatch(x.float(), topk_idx)
        raise AssertionError("a float32 x was accepted")
    except moe_ep.InvalidArgument as e:
        assert e.argument == "x", e.argument

    # Releasing: destroy is collective and frees at once; a dropped buffer is kept until every
    # rank has dropped it, then freed by the next collective.
    group = buf.group
    buf.destroy()
    try:
        buf.low_latency_dispatch(x, topk_idx)
        raise AssertionError("a destroyed buffer was used")
    except moe_ep.MoeEpError as e:
        assert "destroyed" in str(e), str(e)
    assert group.quarantined_bytes() == 0, group.quarantined_bytes()
    if transport == "nvshmem":
        # A dropped buffer in NVSHMEM's memory is not quarantined: NVSHMEM keeps its memory
        # until it is finalised.
        kept = moe_ep.Buffer(group, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=16)
        del kept
        gc.collect()
        assert group.quarantined_bytes() == 0, group.quarantined_bytes()
    # moe-ep's own heap: kept until every rank has dropped it (refused across nodes).
    if spans:
        try:
            moe_ep.Buffer(group, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=16, ll_transport="ipc")
            raise AssertionError("a low-latency buffer in moe-ep's heap across nodes was accepted")
        except moe_ep.InvalidArgument as e:
            assert e.argument == "group" and "with_nvshmem" in str(e), (e.argument, str(e))
    else:
        dropped = moe_ep.Buffer(group, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=16, ll_transport="ipc")
        del dropped
        gc.collect()
        assert group.quarantined_bytes() > 0, "a dropped buffer's memory was freed at once"
        freed = group.reclaim_dropped()
        assert freed > 0 and group.quarantined_bytes() == 0, (freed, group.quarantined_bytes())
    dist.barrier()
    print(f"rank {rank}: moe_ep GPU checks passed")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
