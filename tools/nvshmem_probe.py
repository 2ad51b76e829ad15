"""NVSHMEM spike, GPU proof: the Rust kernels of `cargo xtask build-ptx --nvshmem` (NVSHMEM's
device bitcode linked in) running on NVSHMEM, under torchrun, one process per GPU:

    LD_LIBRARY_PATH=<site-packages>/nvidia/nvshmem/lib:$LD_LIBRARY_PATH \
    torchrun --nproc-per-node N tools/nvshmem_probe.py target/ptx/moe_ep_nvshmem.ptx

A prototype of the host bootstrap in Python (ctypes), before it moves into the library:
- NVSHMEM's host library from the `nvidia-nvshmem-cu13` wheel, initialised by unique id (rank 0
  makes it; torch.distributed carries it to the others);
- our PTX module loaded with the driver API and bound to NVSHMEM (`nvshmemx_cumodule_init`);
- symmetric buffers from `nvshmem_malloc`;
- `nvshmem_ping_pong`: round trips of an 8-byte put with signal between ranks 0 and 1;
- `nvshmem_put_bw`: every rank puts a buffer to rank + 1, all at once (like the benchmark's
  "every rank storing at once"), and rank 0 alone to rank 1.
Every call's status is checked and printed on failure; the figures are printed per rank.
"""

import ctypes as C
import os
import struct
import sys
import time

import torch
import torch.distributed as dist

# NVSHMEMX_INIT_ATTR_INITIALIZER of NVSHMEM 3.8 (nvshmemx_init_attr_v2, 144 bytes), as the
# headers' initializer lays it out (printed by a C program built against the wheel's headers).
ATTR_INIT = bytes([144, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 128, 0, 2, 0, 0, 0, 0, 0, 24, 0, 1, 0, 0, 0, 0, 0] + [0] * 8 + [255] * 12 + [0] * 92)
UID_VERSION = (1 << 16) + 128
INIT_WITH_UNIQUEID = 1 << 3


def ok(what, rc):
    if rc != 0:
        raise RuntimeError(f"{what} returned {rc}")


def main():
    ptx_path = sys.argv[1]
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.zeros(1, device="cuda")  # the primary context, current on this thread
    name = torch.cuda.get_device_name()
    # The host library must be the version whose device bitcode the module was built with
    # (NVSHMEM_HOST_LIB, e.g. the 3.8.0 wheel's); else the installed wheel's.
    lib = os.environ.get("NVSHMEM_HOST_LIB")
    if not lib:
        import nvidia.nvshmem

        lib = os.path.join(list(nvidia.nvshmem.__path__)[0], "lib", "libnvshmem_host.so.3")
    nv = C.CDLL(lib, mode=C.RTLD_GLOBAL)
    major, minor, patch = C.c_int(), C.c_int(), C.c_int()
    nv.nvshmemx_vendor_get_version_info(C.byref(major), C.byref(minor), C.byref(patch))
    if rank == 0:
        print(f"rank 0: NVSHMEM host library {lib}: version {major.value}.{minor.value}.{patch.value}", flush=True)
    cu = C.CDLL("libcuda.so.1")
    nv.nvshmem_malloc.restype = C.c_void_p
    nv.nvshmem_malloc.argtypes = [C.c_size_t]

    uid = (C.c_char * 128)()
    struct.pack_into("<i", uid, 0, UID_VERSION)
    if rank == 0:
        ok("nvshmemx_get_uniqueid", nv.nvshmemx_get_uniqueid(uid))
    box = [bytes(uid) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    C.memmove(uid, box[0], 128)
    attr = (C.c_char * 144).from_buffer_copy(ATTR_INIT)
    ok("nvshmemx_set_attr_uniqueid_args", nv.nvshmemx_set_attr_uniqueid_args(rank, world, uid, attr))
    t0 = time.perf_counter()
    # The shared host library's own initialisation (the header's inline nvshmemx_init_attr goes
    # through libnvshmem_device.a, which a module loaded with the driver API does not link).
    ok("nvshmemx_hostlib_init_attr", nv.nvshmemx_hostlib_init_attr(INIT_WITH_UNIQUEID, attr))
    init_ms = (time.perf_counter() - t0) * 1e3
    me, npes = nv.nvshmem_my_pe(), nv.nvshmem_n_pes()
    print(f"rank {rank} of {world} ({name}): NVSHMEM initialised by unique id in {init_ms:.0f} ms: PE {me} of {npes}", flush=True)

    module = C.c_void_p()
    ptx = open(ptx_path, "rb").read() + b"\0"
    ok("cuModuleLoadData", cu.cuModuleLoadData(C.byref(module), ptx))
    ok("nvshmemx_cumodule_init", nv.nvshmemx_cumodule_init(module))
    funcs = {}
    for k in ("nvshmem_ping_pong", "nvshmem_put_bw"):
        f = C.c_void_p()
        ok(f"cuModuleGetFunction({k})", cu.cuModuleGetFunction(C.byref(f), module, k.encode()))
        funcs[k] = f
    stream = C.c_void_p(torch.cuda.current_stream().cuda_stream)

    def launch(k, grid, block, params):
        buf = C.create_string_buffer(params, len(params))
        args = (C.c_void_p * 1)(C.addressof(buf))
        ok(f"cuLaunchKernel({k})", cu.cuLaunchKernel(funcs[k], grid, 1, 1, block, 1, 1, 0, stream, args, None))

    def barrier():
        torch.cuda.synchronize()
        nv.nvshmem_barrier_all()

    # Ping-pong between PEs 0 and 1.
    data, sig = nv.nvshmem_malloc(16), nv.nvshmem_malloc(8)
    assert data and sig, "nvshmem_malloc failed"
    elapsed = torch.zeros(1, dtype=torch.int64, device="cuda")
    iters = 20000
    for trial in range(3):
        ok("cuMemsetD8", cu.cuMemsetD8_v2(C.c_uint64(sig), 0, 8))
        barrier()
        if me < 2:
            launch("nvshmem_ping_pong", 1, 32, struct.pack("<QQiIIIQ", data, sig, 1 - me, int(me == 0), iters, 0, elapsed.data_ptr()))
        barrier()
        if me == 0 and trial == 2:
            rtt = elapsed.item() / iters / 1e3
            print(f"rank 0 of {world} ({name}): NVSHMEM put-with-signal round trip PE 0 <-> PE 1: {rtt:.2f} us (the last of 3 trials of {iters} round trips)", flush=True)

    # Put bandwidth.
    nbytes, reps = 256 << 20, 10
    src, dst = nv.nvshmem_malloc(nbytes), nv.nvshmem_malloc(nbytes)
    assert src and dst, "nvshmem_malloc of the bandwidth buffers failed"
    for label, active in (("every PE to PE + 1 at once", True), ("PE 0 to PE 1 alone", me == 0)):
        for blocks in (24, 132):
            barrier()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            if active:
                launch("nvshmem_put_bw", blocks, 256, struct.pack("<QQQiI", src, dst, nbytes, (me + 1) % npes, reps))
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
            if active:
                print(f"rank {rank} of {world} ({name}): NVSHMEM put {label}, {blocks} blocks: {nbytes * reps / ms / 1e6:.1f} GB/s ({nbytes >> 20} MiB x {reps})", flush=True)
    barrier()
    nv.nvshmem_free(C.c_void_p(src))
    nv.nvshmem_free(C.c_void_p(dst))
    nv.nvshmem_free(C.c_void_p(data))
    nv.nvshmem_free(C.c_void_p(sig))
    ok("nvshmemx_cumodule_finalize", nv.nvshmemx_cumodule_finalize(module))
    nv.nvshmemx_hostlib_finalize()
    print(f"rank {rank}: NVSHMEM finalised", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
