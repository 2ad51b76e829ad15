"""The Python binding's cost per low-latency call, under torchrun:

    torchrun --nproc-per-node N python/examples/overhead.py

DeepEP's decode shape (128 tokens per rank, hidden 7168, top-8 of 256, FP8 dispatch, BF16
combine: pre-reduced through ``moe_ep.Buffer``, per expert through DeepEP's face
``moe_ep.deep_ep.Buffer``). For ``low_latency_dispatch`` and ``low_latency_combine`` of each it
prints, as medians over 200 calls:

- ``host``: the CPU time of the whole call (tensor checks, views, the launch): the package's
  Python for ``moe_ep.Buffer``, the extension's base class for ``moe_ep.deep_ep.Buffer``;
- ``extension``: the CPU time of the Rust extension's call alone (argument conversion, checks,
  the Rust API's launch; for DeepEP's dispatch, ``deep_ep_dispatch``, which also hands out the
  received views and the handle), so ``host - extension`` is what the method adds over it, and
  ``LowLatencyBuffer.last_ext_us`` splits the extension's share into its function's own time
  and the rest (the Python-C boundary, the stream lookup);
- ``Rust API``: the part of the call spent inside the Rust API (``LowLatencyBuffer.last_api_us``:
  size checks, parameter block, launch, completion event), so ``host - Rust API`` is what the
  binding adds to a call of the Rust crate;
- ``GPU``: the time between CUDA events around the call, the call queued right after a GPU
  barrier of the group (a barrier that does not hold, so part of the launch is inside: compare
  with ``moe-ep-bench ll --hold-us 0``).

A last pass repeats DeepEP's face with the extension's stage marks on (``_moe_ep._profile``):
the median CPU time of each stage of the method's body (stream lookup, tensor checks, launch
arguments, the Rust API, the handle and the views, hook and event), and what lies outside the
body (the call itself, argument parsing, the result). Beside it, the same loop times a method of
``low_latency_dispatch``'s signature that does nothing (``_call_cost_probe``): what the call
itself costs in the timed loop's conditions, where caches are colder than in a loop of calls.

It names the path that reads tensors' metadata (``moe_ep.tensor_path()``: torch's C shim, or
the tensors' attributes; ``MOE_EP_TORCH_SHIM=0`` forces the attributes).

With ``MOE_EP_PIN_CORES=1`` each rank's process (and every thread it starts later) runs on
one physical core of its own, set before torch is imported (its hardware threads, from ``/sys``), chosen by local rank and
skipping core 0: the ranks' processes and their helper threads then do not share a core. Each
rank prints where it runs.

With ``MOE_EP_OVERHEAD_STAGGER_US=N`` rank ``r`` waits ``r * N`` microseconds (spinning)
before each step's barrier, so the ranks' timed calls do not reach the CUDA driver (and, under
MPS, its server) at the same moment.

The Rust benchmark (``moe-ep-bench ll``) prints the Rust API's host time per call too.
"""

import gc
import os
import statistics
import time

HIDDEN, EXPERTS, TOPK, TOKENS, ITERS, WARMUP = 7168, 256, 8, 128, 200, 20


def physical_cores():
    """The machine's physical cores, each as the set of its hardware threads (from /sys), in
    order of their first thread; None where /sys does not say."""
    cores = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            return None
        siblings = set()
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            siblings.update(range(int(lo), int(hi or lo) + 1))
        cores.setdefault(min(siblings), siblings & os.sched_getaffinity(0))
    return [cores[k] for k in sorted(cores)]


def pin_to_core(local_rank):
    """With MOE_EP_PIN_CORES=1: this process on physical core `local_rank + 1` alone (what it
    says where it runs), else nothing."""
    if os.environ.get("MOE_EP_PIN_CORES") != "1":
        return "not pinned (MOE_EP_PIN_CORES=1 pins each rank to a core of its own)"
    cores = physical_cores()
    if not cores or len(cores) < local_rank + 2:
        return f"not pinned: {len(cores or [])} physical cores known, rank {local_rank} needs {local_rank + 2}"
    os.sched_setaffinity(0, cores[local_rank + 1])
    return f"pinned to CPUs {sorted(os.sched_getaffinity(0))} (physical core {local_rank + 1} of {len(cores)}) before importing torch"


def main_thread_counters():
    """This process's main thread (the timed one): the CPU it last ran on, its voluntary and
    involuntary context switches and its migrations between CPUs (from /proc; None where
    /proc does not say)."""
    out = {"cpu": None, "voluntary": None, "involuntary": None, "migrations": None}
    try:
        with open("/proc/self/stat") as f:
            out["cpu"] = int(f.read().rsplit(")", 1)[1].split()[36])
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "voluntary_ctxt_switches":
                    out["voluntary"] = int(value)
                elif key == "nonvoluntary_ctxt_switches":
                    out["involuntary"] = int(value)
        with open("/proc/self/sched") as f:
            for line in f:
                if line.startswith("se.nr_migrations"):
                    out["migrations"] = int(line.split(":")[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


# Pinned (MOE_EP_PIN_CORES=1) before torch is imported, so that what the process allocates
# from here on is first touched on the CPU it will run on.
PINNED = pin_to_core(int(os.environ.get("LOCAL_RANK", "0")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import moe_ep  # noqa: E402
import moe_ep.deep_ep as deep_ep  # noqa: E402


def main():
    pinned = PINNED
    dist.init_process_group(moe_ep.dist_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank}: {pinned}", flush=True)
    torch.cuda.set_device(moe_ep.local_device())
    experts = (EXPERTS + world - 1) // world * world
    buf = moe_ep.Buffer(None, hidden=HIDDEN, num_experts=experts, num_topk=TOPK, num_max_dispatch_tokens_per_rank=TOKENS)
    x = torch.randn(TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    idx = torch.rand(TOKENS, experts, device="cuda").topk(TOPK, dim=1).indices.to(torch.int64)
    w = torch.rand(TOKENS, TOPK, device="cuda")
    epr = experts // world
    y = torch.randn(epr, world * TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    out = torch.empty(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    ll, group = buf._ll, buf.group
    # DeepEP's face (moe_ep.deep_ep), per-expert combine as DeepEP's, on a buffer of its own.
    dbuf = deep_ep.Buffer(group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, HIDDEN, world, experts), low_latency_mode=True)
    dbuf.low_latency_dispatch(x, idx, TOKENS, experts)
    dll, _, dviews = dbuf._ll_state
    make_views = deep_ep._make_ll_views

    def calls(which):
        """(dispatch, combine, the extension buffer) as the package's methods, DeepEP's methods
        (`moe_ep.deep_ep`) or the extension's calls."""
        if which == "python":
            return (
                lambda: buf.low_latency_dispatch(x, idx, topk_weights=w)[2],
                lambda h: buf.low_latency_combine(y, idx, None, h, out=out, pre_reduced=True),
                ll,
            )
        if which == "deep_ep":
            return (
                lambda: dbuf.low_latency_dispatch(x, idx, TOKENS, experts)[2],
                lambda h: dbuf.low_latency_combine(y, idx, w, h, out=out),
                dll,
            )
        if which == "deep_ep call cost":
            probe = lambda: dbuf._call_cost_probe(x, idx, TOKENS, experts)[2]  # noqa: E731
            return (probe, lambda h: probe(), dll)
        if which == "deep_ep extension":
            return (
                lambda: dll.deep_ep_dispatch(dbuf._raw_stream(), x, idx, TOKENS, experts, True, "f32", False, None, dviews, make_views)[2],
                lambda h: dll.combine(dbuf._raw_stream(), h, y, idx, out, w, False, False),
                dll,
            )
        return (
            lambda: ll.dispatch(buf._stream(), x, idx, w, True, "f32", False, False),
            lambda h: ll.combine(buf._stream(), h, y, idx, out, None, True, False),
            ll,
        )

    stagger = float(os.environ.get("MOE_EP_OVERHEAD_STAGGER_US", "0")) * rank / 1e6
    if rank == 0 and float(os.environ.get("MOE_EP_OVERHEAD_STAGGER_US", "0")) > 0:
        print(f"rank 0: every rank r waits r * {os.environ['MOE_EP_OVERHEAD_STAGGER_US']} us before each step's barrier", flush=True)
    samples = {}
    before = main_thread_counters()
    # The last pass: DeepEP's face again, with the extension's stage marks on (its figures are
    # kept apart from the others).
    stages = {"dispatch": {}, "combine": {}}
    for which in ("python", "extension", "deep_ep", "deep_ep extension", "deep_ep call cost", "deep_ep marked"):
        profiled = which == "deep_ep marked"
        moe_ep._moe_ep._profile(profiled)
        dispatch, combine, part = calls("deep_ep" if profiled else which)
        host = {"dispatch": [], "combine": []}
        gpu = {"dispatch": [], "combine": []}
        api = {"dispatch": [], "combine": []}
        inside = {"dispatch": [], "combine": []}
        for it in range(ITERS + WARMUP):
            h = None
            for op in ("dispatch", "combine"):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if stagger:
                    until = time.perf_counter() + stagger
                    while time.perf_counter() < until:
                        pass
                group.launch_barrier(torch.cuda.current_stream().cuda_stream)
                a.record()
                t0 = time.perf_counter()
                if op == "dispatch":
                    h = dispatch()
                else:
                    combine(h)
                t1 = time.perf_counter()
                b.record()
                b.synchronize()
                if it >= WARMUP and profiled:
                    for stage, us in moe_ep._moe_ep._stages():
                        stages[op].setdefault(stage, []).append(us)
                if it >= WARMUP:
                    host[op].append((t1 - t0) * 1e6)
                    api[op].append(part.last_api_us)
                    inside[op].append(part.last_ext_us)
                    gpu[op].append(a.elapsed_time(b) * 1e3)
        samples[which] = {
            op: (statistics.median(host[op]), statistics.median(gpu[op]), statistics.median(api[op]), statistics.median(inside[op])) for op in host
        }
    moe_ep._moe_ep._profile(False)
    after = main_thread_counters()
    group.check()
    name = torch.cuda.get_device_name()
    if rank == 0:
        print(f"rank 0 ({name}): tensor reads through {moe_ep.tensor_path()}", flush=True)
        # Where the extension's CPU time goes: what one tensor's check reads, item by item.
        dev = torch.cuda.current_device()
        items = {
            "x.data_ptr()": lambda: x.data_ptr(),
            "x.shape": lambda: x.shape,
            "str(x.dtype)": lambda: str(x.dtype),
            "x.is_cuda": lambda: x.is_cuda,
            "x.get_device()": lambda: x.get_device(),
            "x.is_contiguous()": lambda: x.is_contiguous(),
            "x.stride()": lambda: x.stride(),
            "check_tensor(x) (all of the above)": lambda: moe_ep.check_tensor("x", x, ["torch.bfloat16"], [None, HIDDEN], dev),
            "Buffer._stream()": lambda: buf._stream(),
            "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
            "deep_ep.Buffer: a call of low_latency_dispatch's signature doing nothing": lambda: dbuf._call_cost_probe(x, idx, TOKENS, experts),
            "deep_ep.EventOverlap()": deep_ep.EventOverlap,
            "empty Python call": lambda: None,
            "time.perf_counter() (a clock read)": time.perf_counter,
        }
        for label, f in items.items():
            n = 20000
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            print(f"rank 0 ({name}): {label}: {(time.perf_counter() - t0) / n * 1e6:.3f} us", flush=True)
    for face, ext in (("python", "extension"), ("deep_ep", "deep_ep extension")):
        for op in ("dispatch", "combine"):
            (ph, pg, pa, pi), (eh, eg, _, _) = samples[face][op], samples[ext][op]
            label = "moe_ep.Buffer" if face == "python" else "moe_ep.deep_ep.Buffer"
            print(
                f"rank {rank} of {world} ({name}): {label}.low_latency_{op}: host {ph:.1f} us per call, of which Rust API {pa:.1f} us, "
                f"so the binding adds {ph - pa:.1f} us (the method over the extension's call {ph - eh:.1f} us, extension {eh - pa:.1f} us: "
                f"{pi - pa:.1f} us inside its function, {eh - pi:.1f} us at the Python-C boundary and the stream lookup); "
                f"GPU {pg:.1f} us (extension alone {eg:.1f} us), medians of {ITERS}",
                flush=True,
            )
    print(
        f"rank {rank} of {world} ({name}): a method of low_latency_dispatch's signature doing nothing, timed as the calls above: "
        f"host {samples['deep_ep call cost']['dispatch'][0]:.2f} us, medians of {ITERS}",
        flush=True,
    )
    delta = {k: (after[k] - before[k] if after[k] is not None and before[k] is not None else None) for k in ("voluntary", "involuntary", "migrations")}
    print(
        f"rank {rank} of {world} ({name}): the timed passes' thread: on CPU {before['cpu']} before them, CPU {after['cpu']} after; "
        f"during them {delta['voluntary']} voluntary and {delta['involuntary']} involuntary context switches, {delta['migrations']} migrations",
        flush=True,
    )
    for op in ("dispatch", "combine"):
        ph = samples["deep_ep marked"][op][0]
        parts = [(stage, statistics.median(v)) for stage, v in stages[op].items()]
        listed = ", ".join(f"{stage} {us:.2f}" for stage, us in parts)
        print(
            f"rank {rank} of {world} ({name}): moe_ep.deep_ep.Buffer.low_latency_{op} with stage marks on: host {ph:.1f} us = {listed}, "
            f"and {ph - sum(us for _, us in parts):.2f} us outside the method's body (the call, its arguments, the result), medians of {ITERS}",
            flush=True,
        )
    dist.destroy_process_group()
    # The objects go one at a time, each named first (with PYTHONFAULTHANDLER=1 a crash in one's
    # teardown then names its line).
    def gone(what):
        if os.environ.get("MOE_EP_TEARDOWN_TRACE") == "1":
            print(f"rank {rank}: dropped {what}", flush=True)

    del h
    gone("the last handle")
    del dispatch, combine, part
    gone("the last calls")
    dbuf._ll_state = (None, None, None)
    del dviews
    gone("deep_ep's view cache (its tensors)")
    del dll
    gone("the deep_ep low-latency buffer")
    del dbuf
    gone("the deep_ep Buffer")
    del ll
    gone("the moe_ep low-latency buffer (local)")
    del buf
    gone("the moe_ep Buffer")
    del group
    gone("the group")
    gc.collect()
    gone("everything (gc)")


if __name__ == "__main__":
    main()
