"""GPU check of ``moe_ep.deep_ep`` (DeepEP's API) under torchrun, one process per GPU or every
rank on GPU 0 under CUDA MPS (``MOE_EP_SHARE_GPU=1``):

    torchrun --nproc-per-node N python/tests/test_deep_ep.py

The engines' call sequences (``../shared/ENGINES.md``), each checked against a torch reference
built from every rank's inputs (all-gathered):
- vLLM's low-latency path: both halves in hook mode, FP8 with every scale form (f32,
  power-of-two, UE8M0, column-major as DeepEP's), BF16, the expert-load statistics, then a decode
  step captured with ``torch.cuda.graph`` and replayed on new inputs;
- vLLM's dual-batch overlap: two micro-batches in flight on two Python threads, each one's hooks
  run on the other's thread;
- SGLang's low-latency mode with ``x.set_(empty)`` on a received tensor;
- the high-throughput path as vLLM calls it (``capture``, ``previous_event``, ``async_finish``,
  ``allocate_on_comm_stream``, configs), a cached dispatch, FP8 with strided and UE8M0 scales,
  ``num_worst_tokens``, and SGLang's two-batch overlap (two dispatches, then two combines);
- a switch from the normal mode to the low-latency mode (``clean_low_latency_buffer``);
- a rank with no tokens.
"""

import faulthandler
import gc
import os
import threading

import torch
import torch.distributed as dist

import moe_ep
import moe_ep.deep_ep as deep_ep

HIDDEN, TOPK, T_LL, T_HT = 2048, 4, 32, 96


def gather(t):
    """Every rank's `t` (CPU all-gather: the gloo backend under MPS), back on this GPU."""
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64))
    n = max(int(s) for s in sizes)
    pad = torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
    pad[: t.shape[0]] = t.cpu()
    out = [torch.zeros_like(pad) for _ in range(world)]
    if t.dtype in (torch.bfloat16, torch.int16):
        # (gloo all-gathers neither bfloat16 nor int16: their bytes travel as uint8.)
        view = [o.view(torch.uint8) for o in out]
        dist.all_gather(view, pad.view(torch.uint8))
    else:
        dist.all_gather(out, pad)
    return [o[: int(s)].cuda() for o, s in zip(out, sizes)]


def routing(gen, n, experts):
    idx = torch.rand(n, experts, generator=gen).topk(TOPK, dim=1).indices
    idx[torch.rand(n, TOPK, generator=gen) < 0.1] = -1
    w = torch.rand(n, TOPK, generator=gen)
    return idx.to(torch.int64).cuda(), w.cuda()


def inputs(gen, n, experts):
    x = (torch.randn(n, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    idx, w = routing(gen, n, experts)
    return x, idx, w


def expert_scale(e):
    return 1.0 + (e % 7) / 8.0


def ll_reference_rows(xs, idxs, rank, epr):
    """Per local expert, {(source, token): row} of what this rank must receive."""
    want = [dict() for _ in range(epr)]
    for s, (x, idx) in enumerate(zip(xs, idxs)):
        for t in range(idx.shape[0]):
            for e in idx[t].tolist():
                if e >= 0 and e // epr == rank:
                    want[e % epr][(s, t)] = x[t]
    return want


def recv_x_hidden(recv_x):
    """The hidden size of low-latency received rows (a tensor, or FP8 rows and scales)."""
    return (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[-1]


def dequant(q, scales, ue8m0):
    """FP8 rows ``[n, H]`` and their scales ``[n, H / 128]`` (float32, or UE8M0 bytes) to f32."""
    if ue8m0:
        scales = (scales.to(torch.int32) << 23).view(torch.float32)
    return (q.float().view(q.shape[0], -1, 128) * scales.unsqueeze(-1)).view(q.shape[0], -1)


def check_ll_received(recv_x, count, handle, want, use_fp8, ue8m0, what):
    src = handle[0]
    # DeepEP's handle is a tuple of five: indexing, unpacking and slicing as on one.
    src2, layout_range, tokens, hidden, experts = handle
    assert len(handle) == 5 and src2 is src and layout_range is None and handle[-1] == experts, f"{what}: handle {tuple(handle)[1:]}"
    assert handle[2:4] == (tokens, hidden) and hidden == recv_x_hidden(recv_x), f"{what}: handle {tuple(handle)[1:]}"
    for e in range(len(want)):
        c = int(count[e])
        assert c == len(want[e]), f"{what}: expert {e} received {c} rows, expected {len(want[e])}"
        info = src[e, :c].tolist()
        keys = [((v >> 24) & 0xFF, v & 0xFFFF) for v in info]
        assert sorted(keys) == sorted(want[e]), f"{what}: expert {e} received other rows than routed to it"
        ref = torch.stack([want[e][kk] for kk in keys]) if keys else None
        if ref is None:
            continue
        if use_fp8:
            q, sc = recv_x
            scales = sc[e, :c]
            if ue8m0:
                scales = scales.contiguous().view(torch.uint8)[:, : HIDDEN // 128]
            got = dequant(q[e, :c], scales, ue8m0)
            torch.testing.assert_close(got, ref.float(), rtol=0.13, atol=1e-2, msg=lambda m: f"{what}: expert {e}: {m}")
        else:
            assert torch.equal(recv_x[e, :c], ref), f"{what}: expert {e}: received rows differ"


_SCALES = {}


def expert_outputs(recv_x, count, epr):
    """bf16 ``[E_local, R * T, H]``: received row times the expert's scale (the received BF16
    rows; rows past the count are whatever the buffer holds). The scales are made once, before
    any graph capture."""
    scale = _SCALES.get(epr)
    if scale is None:
        scale = _SCALES[epr] = torch.tensor([expert_scale(e) for e in range(epr)], device="cuda").view(epr, 1, 1)
    return (recv_x.float() * scale).to(torch.bfloat16)


def ll_combine_reference(x, idx, w, epr):
    ref = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float32, device="cuda")
    for t in range(x.shape[0]):
        for k, e in enumerate(idx[t].tolist()):
            if e >= 0:
                y = (x[t].float() * expert_scale(e % epr)).to(torch.bfloat16).float()
                ref[t] += w[t, k] * y
    return ref.to(torch.bfloat16)


def close(got, ref, what):
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")


def main():
    # A hang prints every thread's stack and ends the process (well inside run.sh's limit).
    faulthandler.dump_traceback_later(float(os.environ.get("MOE_EP_TEST_HANG_S", "80")), exit=True)
    dist.init_process_group(moe_ep.dist_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(moe_ep.local_device())
    experts = 8 * world
    epr = experts // world
    gen = torch.Generator().manual_seed(1234 + rank)
    print(f"rank {rank} of {world} ({torch.cuda.get_device_name()}): moe_ep.deep_ep checks", flush=True)

    # ---- vLLM's low-latency path ----
    ll_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(T_LL, HIDDEN, world, experts)
    ht_bytes = deep_ep.Config(24).get_nvl_buffer_size_hint(HIDDEN * 2, world)
    buf = deep_ep.Buffer(None, ht_bytes, ll_bytes, low_latency_mode=True, num_qps_per_rank=epr, explicitly_destroy=True)
    assert buf.group_size == world and buf.rank == rank and buf.low_latency_mode
    n = 0 if rank == 0 else T_LL - rank  # rank 0 has no tokens
    x, idx, w = inputs(gen, n, experts)
    xs, idxs = gather(x), gather(idx)
    want = ll_reference_rows(xs, idxs, rank, epr)
    stats = torch.zeros(epr, dtype=torch.int32, device="cuda")
    forms = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    for use_fp8, round_scale, ue8m0 in forms:
        what = f"low-latency dispatch (fp8={use_fp8}, round_scale={round_scale}, ue8m0={ue8m0})"
        recv_x, count, handle, event, hook = buf.low_latency_dispatch(
            x, idx, T_LL, experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8, round_scale=round_scale,
            use_ue8m0=ue8m0, async_finish=False, return_recv_hook=True,
        )
        hook()
        torch.cuda.synchronize()
        check_ll_received(recv_x, count, handle, want, use_fp8, ue8m0, what)
        if use_fp8:
            q, sc = recv_x
            assert q.dtype == torch.float8_e4m3fn and q.shape == (epr, world * T_LL, HIDDEN), q.shape
            groups = HIDDEN // 512 if ue8m0 else HIDDEN // 128
            assert sc.shape == (epr, world * T_LL, groups) and sc.stride(1) == 1, (sc.shape, sc.stride())
    expected_stats = torch.tensor([len(want[e]) * len(forms) for e in range(epr)], dtype=torch.int32, device="cuda")
    assert torch.equal(stats, expected_stats), f"rank {rank}: statistics {stats.tolist()}, expected {expected_stats.tolist()}"
    recv_x, count, handle, _, hook = buf.low_latency_dispatch(x, idx, T_LL, experts, use_fp8=False, return_recv_hook=True)
    hook()
    y = expert_outputs(recv_x, count, epr)
    out, _, hook = buf.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
    hook()
    torch.cuda.synchronize()
    close(out, ll_combine_reference(x, idx, w, epr), "low-latency combine (hook mode)")
    # Zero copy: the expert outputs written into the buffer's own combine input.
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, T_LL, experts, use_fp8=False)
    buf.get_next_low_latency_combine_buffer(handle).copy_(expert_outputs(recv_x, count, epr))
    out, _, _ = buf.low_latency_combine(None, idx, w, handle, zero_copy=True, async_finish=True)[0:3]
    torch.cuda.synchronize()
    close(out, ll_combine_reference(x, idx, w, epr), "low-latency combine (zero copy)")
    print(f"rank {rank}: vLLM low-latency path (hook mode, FP8 f32/pow2/UE8M0, BF16, statistics, zero copy) matches", flush=True)

    # A decode step captured in a CUDA graph (both halves in hook mode), replayed on new inputs.
    sx, sidx, sw = x.clone(), idx.clone(), w.clone()
    sout = torch.empty(n, HIDDEN, dtype=torch.bfloat16, device="cuda")

    def step():
        rx, cnt, h, _, hk = buf.low_latency_dispatch(sx, sidx, T_LL, experts, use_fp8=False, return_recv_hook=True)
        hk()
        yy = expert_outputs(rx, cnt, epr)
        _, _, hk2 = buf.low_latency_combine(yy, sidx, sw, h, return_recv_hook=True, out=sout)
        hk2()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for it in range(3):
        nx, nidx, nw = inputs(gen, n, experts)
        sx.copy_(nx)
        sidx.copy_(nidx)
        sw.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        close(sout, ll_combine_reference(nx, nidx, nw, epr), f"graph replay {it}")
    print(f"rank {rank}: a hook-mode decode step captured with torch.cuda.graph matches on 3 replays", flush=True)

    # ---- vLLM's dual-batch overlap: two micro-batches on two threads, hooks crossed ----
    mbs = [inputs(gen, n, experts) for _ in range(2)]
    results = [dict(), dict()]
    order = [(0, "dispatch", 0), (1, "dispatch", 1), (0, "dhook", 1), (1, "dhook", 0), (0, "combine", 0), (1, "combine", 1), (1, "chook", 0), (0, "chook", 1)]
    turn = threading.Condition()
    state = {"step": 0, "error": None}

    def worker(me):
        torch.cuda.set_device(moe_ep.local_device())
        for i, (who, op, mb) in enumerate(order):
            with turn:
                # `>=`: the other thread may already have run step i (and more) by the time
                # this one looks; only the step's owner must wait for exactly its turn.
                turn.wait_for(lambda: state["step"] >= i or state["error"] is not None)
                if state["error"] is not None:
                    return
            if who == me:
                try:
                    r = results[mb]
                    xb, ib, wb = mbs[mb]
                    if op == "dispatch":
                        r["recv"], r["count"], r["handle"], _, r["dhook"] = buf.low_latency_dispatch(xb, ib, T_LL, experts, use_fp8=False, return_recv_hook=True)
                    elif op == "dhook":
                        r["dhook"]()
                    elif op == "combine":
                        yy = expert_outputs(r["recv"], r["count"], epr)
                        r["out"], _, r["chook"] = buf.low_latency_combine(yy, ib, wb, r["handle"], return_recv_hook=True)
                    else:
                        r["chook"]()
                except Exception as e:  # noqa: BLE001 - reported by the main thread
                    state["error"] = e
                with turn:
                    state["step"] = i + 1
                    turn.notify_all()

    other = threading.Thread(target=worker, args=(1,))
    other.start()
    worker(0)
    other.join()
    if state["error"] is not None:
        raise state["error"]
    torch.cuda.synchronize()
    for mb in range(2):
        xb, ib, wb = mbs[mb]
        close(results[mb]["out"], ll_combine_reference(xb, ib, wb, epr), f"dual-batch micro-batch {mb}")
    print(f"rank {rank}: vLLM's dual-batch overlap (two micro-batches in flight, hooks on the other thread) matches", flush=True)

    # ---- SGLang's low-latency mode: the received tensor emptied with set_ ----
    recv_x, count, handle, _, hook = buf.low_latency_dispatch(x, idx, T_LL, experts, use_fp8=True, round_scale=True, use_ue8m0=True, return_recv_hook=True)
    hook()
    recv_x[0].set_(torch.empty((0,), dtype=recv_x[0].dtype, device="cuda"))
    recv_x2, count2, handle2, _, hook2 = buf.low_latency_dispatch(x, idx, T_LL, experts, use_fp8=True, round_scale=True, use_ue8m0=True, return_recv_hook=True)
    hook2()
    torch.cuda.synchronize()
    assert recv_x2[0].shape == (epr, world * T_LL, HIDDEN), recv_x2[0].shape
    check_ll_received(recv_x2, count2, handle2, want, True, True, "after set_(empty) on an earlier received tensor")
    print(f"rank {rank}: SGLang's set_(empty) on a received tensor leaves later dispatches whole", flush=True)

    # ---- the high-throughput path as vLLM calls it ----
    deep_ep.Buffer.set_num_sms(20)
    nh = 0 if rank == 0 else T_HT - 7 * rank
    hx, hidx, hw = inputs(gen, nh, experts)
    hxs, hidxs, hws = gather(hx), gather(hidx), gather(hw)
    cfg = deep_ep.Buffer.get_dispatch_config(world)
    prev = buf.capture()
    tpr, tprd, tpe, in_rank, ev = buf.get_dispatch_layout(hidx, experts, previous_event=prev, async_finish=True, allocate_on_comm_stream=True)
    assert tprd is None
    recv_x, recv_idx, recv_w, counts, hhandle, ev = buf.dispatch(
        hx, num_tokens_per_rank=tpr, is_token_in_rank=in_rank, num_tokens_per_expert=tpe, topk_idx=hidx, topk_weights=hw,
        expert_alignment=1, config=cfg, previous_event=ev, async_finish=True, allocate_on_comm_stream=True,
    )
    ev.current_stream_wait()
    mine = [((i >= 0) & (i // epr == rank)).any(1) for i in hidxs]
    ref_rows = torch.cat([hxs[s][mine[s]] for s in range(world)])
    assert torch.equal(recv_x, ref_rows), f"rank {rank}: high-throughput rows differ"
    local = [torch.where((i >= 0) & (i // epr == rank), i % epr, -1) for i in hidxs]
    ref_idx = torch.cat([local[s][mine[s]] for s in range(world)])
    assert recv_idx.dtype == torch.int64 and torch.equal(recv_idx, ref_idx), f"rank {rank}: received top-k ids differ"
    ref_w = torch.cat([torch.where(local[s] >= 0, hws[s], 0.0)[mine[s]] for s in range(world)])
    assert torch.equal(recv_w, ref_w), f"rank {rank}: received weights differ"
    ref_counts = [int((ref_idx == e).sum()) for e in range(epr)]
    assert counts == ref_counts, f"rank {rank}: per-expert counts {counts}, expected {ref_counts}"
    def ref_prefix():
        """DeepEP's rank prefix matrix as moe-ep fills it: this rank's column, -1 elsewhere."""
        m = torch.full((world, world), -1, dtype=torch.int32, device="cuda")
        m[:, rank] = torch.tensor([int(v.sum()) for v in mine], dtype=torch.int32).cumsum(0).cuda()
        return m

    assert torch.equal(hhandle[0], ref_prefix()), f"rank {rank}: rank prefix matrix {hhandle[0].tolist()}"
    combined, combined_w, ev = buf.combine(recv_x, hhandle, topk_weights=recv_w, config=deep_ep.Buffer.get_combine_config(world), previous_event=buf.capture(), async_finish=True, allocate_on_comm_stream=True)
    ev.current_stream_wait()
    torch.cuda.synchronize()
    goes = torch.stack([((hidx >= 0) & (hidx // epr == r)).any(1) for r in range(world)], 1) if nh else torch.zeros(0, world, dtype=torch.bool, device="cuda")
    assert torch.equal(in_rank, goes), "is_token_in_rank differs"
    assert torch.equal(tpr, goes.sum(0).to(torch.int32)), "num_tokens_per_rank differs"
    ref_out = (hx.float() * goes.sum(1, keepdim=True).float()).to(torch.bfloat16)
    assert torch.equal(combined, ref_out), f"rank {rank}: high-throughput combine (identity experts) differs"
    assert torch.equal(combined_w, torch.where(hidx >= 0, hw, 0.0)), f"rank {rank}: combined weights differ"
    # A cached dispatch: new tokens, the same routing.
    hx2 = (hx.float() * 2).to(torch.bfloat16)
    recv_x2, _, _, _, _, _ = buf.dispatch(hx2, handle=hhandle)
    torch.cuda.synchronize()
    assert torch.equal(recv_x2, torch.cat([(hxs[s].float() * 2).to(torch.bfloat16)[mine[s]] for s in range(world)])), "cached dispatch rows differ"
    assert torch.equal(recv_x, ref_rows), "the first dispatch's received tensor changed under a later dispatch"
    print(f"rank {rank}: vLLM's high-throughput path (events, comm stream, cached dispatch) matches", flush=True)

    # FP8 with strided float32 scales, and with int32-packed UE8M0 scales.
    groups = HIDDEN // 128
    q = (hx.float() / 4).to(torch.float8_e4m3fn)
    sc_cm = torch.empty(groups, nh, device="cuda").t()
    sc_cm.copy_(torch.rand(nh, groups, generator=gen).cuda() + 0.5)
    _, _, tpe, in_rank, _ = buf.get_dispatch_layout(hidx, experts)
    (rq, rs), _, _, _, _, _ = buf.dispatch((q, sc_cm), is_token_in_rank=in_rank, num_tokens_per_expert=tpe, topk_idx=hidx, topk_weights=hw)
    qs, scs = gather(q.view(torch.uint8)), gather(sc_cm.contiguous())
    assert torch.equal(rq.view(torch.uint8), torch.cat([qs[s][mine[s]] for s in range(world)])), "FP8 rows differ"
    assert torch.equal(rs, torch.cat([scs[s][mine[s]] for s in range(world)])), "strided FP8 scales differ"
    exps = torch.randint(120, 135, (nh, groups), generator=gen, dtype=torch.int32).to(torch.uint8)
    packed = torch.zeros(nh, groups // 4 * 4 + (4 if groups % 4 else 0), dtype=torch.uint8)
    packed[:, :groups] = exps
    packed = packed.view(torch.int32).cuda()
    (rq, rs), _, _, _, _, _ = buf.dispatch((q, packed), is_token_in_rank=in_rank, num_tokens_per_expert=tpe, topk_idx=hidx, topk_weights=hw)
    ps = gather(packed)
    ref_packed = torch.cat([ps[s][mine[s]] for s in range(world)])
    assert rs.dtype == torch.int32 and torch.equal(rs, ref_packed), "UE8M0 scales differ"
    # DeepEP's ordering contract: with `previous_event`, the dispatch waits for that event only.
    # A long kernel queued on the caller's stream after it must neither delay nor feed the
    # dispatch: what the layer makes of the inputs (the UE8M0 scales unpacked, the prefix
    # matrix's -1 fill) belongs on the communication stream.
    prev = buf.capture()
    torch.cuda._sleep(200_000_000)
    (rq, rs), _, _, _, hh3, ev = buf.dispatch(
        (q, packed), is_token_in_rank=in_rank, num_tokens_per_expert=tpe, topk_idx=hidx, topk_weights=hw,
        previous_event=prev, async_finish=True, allocate_on_comm_stream=False,
    )
    ev.current_stream_wait()
    torch.cuda.synchronize()
    assert torch.equal(rs, ref_packed), "UE8M0 scales differ after previous_event with the caller's stream busy"
    assert torch.equal(hh3[0], ref_prefix()), f"rank {rank}: rank prefix matrix {hh3[0].tolist()} (caller's stream busy)"
    # num_worst_tokens: no host synchronisation; that many rows, no per-expert list.
    worst = world * T_HT
    rw_x, rw_idx, _, wcounts, _, _ = buf.dispatch(hx, is_token_in_rank=in_rank, num_tokens_per_expert=tpe, topk_idx=hidx, topk_weights=hw, num_worst_tokens=worst)
    torch.cuda.synchronize()
    assert rw_x.shape == (worst, HIDDEN) and wcounts == [], (rw_x.shape, wcounts)
    assert torch.equal(rw_x[: ref_rows.shape[0]], ref_rows), "num_worst_tokens rows differ"
    assert torch.equal(rw_idx[: ref_rows.shape[0]], ref_idx), "num_worst_tokens top-k ids differ"
    assert bool((rw_idx[ref_rows.shape[0] :] == -1).all()), "num_worst_tokens: rows past those received must have top-k ids -1"
    print(f"rank {rank}: high-throughput FP8 (strided f32 and UE8M0 scales) and num_worst_tokens match", flush=True)

    # SGLang's two-batch overlap: two dispatches in flight, then both combines.
    batches = [inputs(gen, nh, experts) for _ in range(2)]
    flight = []
    for bx, bi, bw in batches:
        _, _, tpe, in_rank, _ = buf.get_dispatch_layout(bi, experts)
        rx, _, rw, _, hd, _ = buf.dispatch(bx, is_token_in_rank=in_rank, num_tokens_per_expert=tpe, topk_idx=bi, topk_weights=bw)
        flight.append((rx, rw, hd))
    for (bx, bi, bw), (rx, rw, hd) in zip(batches, flight):
        out, _, _ = buf.combine(rx, hd)
        g2 = torch.stack([((bi >= 0) & (bi // epr == r)).any(1) for r in range(world)], 1) if nh else torch.zeros(0, world, dtype=torch.bool, device="cuda")
        assert torch.equal(out, (bx.float() * g2.sum(1, keepdim=True).float()).to(torch.bfloat16)), "two-batch overlap combine differs"
    print(f"rank {rank}: SGLang's two-batch overlap (two high-throughput dispatches in flight) matches", flush=True)

    # ---- a switch back to the low-latency mode ----
    buf.clean_low_latency_buffer(T_LL, HIDDEN, experts)
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, T_LL, experts, use_fp8=False)
    out, _, _ = buf.low_latency_combine(expert_outputs(recv_x, count, epr), idx, w, handle)
    torch.cuda.synchronize()
    close(out, ll_combine_reference(x, idx, w, epr), "low-latency after the normal mode")
    print(f"rank {rank}: the switch from the normal mode to the low-latency mode (clean_low_latency_buffer) matches", flush=True)

    # Unsupported arguments are named.
    for call, name in [
        (lambda: buf.low_latency_combine(y, idx, w, handle, use_logfmt=True), "use_logfmt"),
        (lambda: deep_ep.Buffer(None, enable_shrink=True), "enable_shrink"),
    ]:
        try:
            call()
            raise AssertionError(f"{name} was accepted")
        except NotImplementedError as e:
            assert name in str(e), str(e)

    del recv_x, recv_x2
    buf.destroy()
    gc.collect()
    dist.barrier()
    print(f"rank {rank}: moe_ep.deep_ep GPU checks passed", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
