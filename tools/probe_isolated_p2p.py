"""Probe: can two processes that each see only their own GPU share device memory?

    python3 tools/probe_isolated_p2p.py [gpu_a gpu_b]

Runs two child processes, first with every GPU visible, then with `CUDA_VISIBLE_DEVICES` set to
one GPU each (what Slurm's `--gpus-per-task=1` and Kubernetes device plugins give), and tries
both ways a library can share memory between processes:

- legacy CUDA IPC: `cuMemAlloc` + `cuIpcGetMemHandle` on the owner, `cuIpcOpenMemHandle` on the
  peer;
- virtual memory management with a POSIX file descriptor: `cuMemCreate` +
  `cuMemExportToShareableHandle` on the owner, the descriptor passed over a Unix socket
  (SCM_RIGHTS), `cuMemImportFromShareableHandle` + `cuMemMap` + `cuMemSetAccess` on the peer.

The peer then reads the owner's pattern through its mapping and writes a reply the owner
checks. Every driver call's result is printed, so a failure names the call and the code. Only
the driver API through ctypes: no toolkit, no torch, nothing to build.
"""

import ctypes as C
import os
import socket
import subprocess
import sys

SIZE = 2 << 20
PATTERN, REPLY = 0x5EEDC0DE, 0x0DDBA11

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class Location(C.Structure):
    _fields_ = [("type", C.c_int), ("id", C.c_int)]


class AllocFlags(C.Structure):
    _fields_ = [("compressionType", C.c_ubyte), ("gpuDirectRDMACapable", C.c_ubyte), ("usage", C.c_ushort), ("reserved", C.c_ubyte * 4)]


class AllocProp(C.Structure):
    _fields_ = [("type", C.c_int), ("requestedHandleTypes", C.c_int), ("location", Location), ("win32HandleMetaData", C.c_void_p), ("allocFlags", AllocFlags)]


class AccessDesc(C.Structure):
    _fields_ = [("location", Location), ("flags", C.c_int)]


class IpcHandle(C.Structure):
    _fields_ = [("reserved", C.c_char * 64)]


cu = None


def call(name, *args):
    """Calls `name` and returns its CUresult, printing it (and the error's name) when not 0."""
    r = getattr(cu, name)(*args)
    if r != 0:
        s = C.c_char_p()
        cu.cuGetErrorName(r, C.byref(s))
        print(f"    {name} -> {r} ({s.value.decode() if s.value else '?'})", flush=True)
    return r


def setup():
    global cu
    cu = C.CDLL("libcuda.so.1")
    assert call("cuInit", 0) == 0
    dev, ctx = C.c_int(), C.c_void_p()
    assert call("cuDeviceGet", C.byref(dev), 0) == 0
    assert call("cuDevicePrimaryCtxRetain", C.byref(ctx), dev) == 0
    assert call("cuCtxSetCurrent", ctx) == 0
    n = C.c_int()
    call("cuDeviceGetCount", C.byref(n))
    bus = C.create_string_buffer(32)
    call("cuDeviceGetPCIBusId", bus, 32, dev)
    return n.value, bus.value.decode()


def read_word(ptr):
    v = C.c_uint32()
    r = call("cuMemcpyDtoH_v2", C.byref(v), C.c_uint64(ptr), 4)
    call("cuCtxSynchronize")
    return r, v.value


def owner(sock):
    n, bus = setup()
    print(f"  owner: {n} visible GPU(s), using {bus}", flush=True)
    # Legacy IPC.
    legacy = C.c_uint64()
    assert call("cuMemAlloc_v2", C.byref(legacy), SIZE) == 0
    call("cuMemsetD32_v2", legacy, PATTERN, SIZE // 4)
    h = IpcHandle()
    call("cuIpcGetMemHandle", C.byref(h), legacy)
    # VMM with a file descriptor.
    prop = AllocProp(CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, Location(CU_MEM_LOCATION_TYPE_DEVICE, 0))
    gran = C.c_size_t()
    call("cuMemGetAllocationGranularity", C.byref(gran), C.byref(prop), 0)
    size = (SIZE + gran.value - 1) // gran.value * gran.value
    gh, ptr = C.c_uint64(), C.c_uint64()
    assert call("cuMemCreate", C.byref(gh), C.c_size_t(size), C.byref(prop), C.c_ulonglong(0)) == 0
    assert call("cuMemAddressReserve", C.byref(ptr), C.c_size_t(size), C.c_size_t(0), C.c_uint64(0), C.c_ulonglong(0)) == 0
    assert call("cuMemMap", ptr, C.c_size_t(size), C.c_size_t(0), gh, C.c_ulonglong(0)) == 0
    acc = AccessDesc(Location(CU_MEM_LOCATION_TYPE_DEVICE, 0), CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    assert call("cuMemSetAccess", ptr, C.c_size_t(size), C.byref(acc), C.c_size_t(1)) == 0
    call("cuMemsetD32_v2", ptr, PATTERN, size // 4)
    call("cuCtxSynchronize")
    fd = C.c_int(-1)
    r = call("cuMemExportToShareableHandle", C.byref(fd), gh, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, C.c_ulonglong(0))
    print(f"  owner: cuMemExportToShareableHandle -> {r}, fd {fd.value}", flush=True)
    socket.send_fds(sock, [C.string_at(C.addressof(h), 64) + size.to_bytes(8, "little")], [fd.value] if r == 0 else [])
    sock.recv(1)  # the peer has written its replies
    for what, p in (("legacy IPC", legacy.value), ("VMM fd", ptr.value)):
        r, v = read_word(p)
        print(f"  owner: {what}: word 0 is {v:#x} ({'the reply' if v == REPLY else 'not the reply'})", flush=True)


def peer(sock):
    n, bus = setup()
    print(f"  peer: {n} visible GPU(s), using {bus}", flush=True)
    msg, fds, _, _ = socket.recv_fds(sock, 128, 1)
    h = IpcHandle()
    C.memmove(C.addressof(h), msg[:64], 64)
    size = int.from_bytes(msg[64:72], "little")
    results = {}
    p = C.c_uint64()
    r = call("cuIpcOpenMemHandle_v2", C.byref(p), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
    if r == 0:
        r, v = read_word(p.value)
        ok = r == 0 and v == PATTERN and call("cuMemsetD32_v2", p, REPLY, 1) == 0 and call("cuCtxSynchronize") == 0
        results["legacy IPC"] = f"read {v:#x}, {'pattern seen and reply written' if ok else 'FAILED'}"
    else:
        results["legacy IPC"] = f"cuIpcOpenMemHandle failed ({r})"
    if fds:
        gh, ptr = C.c_uint64(), C.c_uint64()
        steps = [
            ("cuMemImportFromShareableHandle", lambda: call("cuMemImportFromShareableHandle", C.byref(gh), C.c_void_p(fds[0]), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)),
            ("cuMemAddressReserve", lambda: call("cuMemAddressReserve", C.byref(ptr), C.c_size_t(size), C.c_size_t(0), C.c_uint64(0), C.c_ulonglong(0))),
            ("cuMemMap", lambda: call("cuMemMap", ptr, C.c_size_t(size), C.c_size_t(0), gh, C.c_ulonglong(0))),
            (
                "cuMemSetAccess",
                lambda: call("cuMemSetAccess", ptr, C.c_size_t(size), C.byref(AccessDesc(Location(CU_MEM_LOCATION_TYPE_DEVICE, 0), CU_MEM_ACCESS_FLAGS_PROT_READWRITE)), C.c_size_t(1)),
            ),
        ]
        failed = next((name for name, f in steps if f() != 0), None)
        if failed is None:
            r, v = read_word(ptr.value)
            ok = r == 0 and v == PATTERN and call("cuMemsetD32_v2", ptr, REPLY, 1) == 0 and call("cuCtxSynchronize") == 0
            results["VMM fd"] = f"read {v:#x}, {'pattern seen and reply written' if ok else 'FAILED'}"
        else:
            results["VMM fd"] = f"{failed} failed"
        os.close(fds[0])
    else:
        results["VMM fd"] = "no descriptor received"
    for k, v in results.items():
        print(f"  peer: {k}: {v}", flush=True)
    sock.send(b"x")


def main():
    if len(sys.argv) > 1 and sys.argv[1] in ("owner", "peer"):
        sock = socket.socket(fileno=int(sys.argv[2]))
        (owner if sys.argv[1] == "owner" else peer)(sock)
        return
    a, b = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else ("0", "1")
    for label, vis in (("every GPU visible (owner on GPU %s, peer on GPU %s)" % (a, b), None), ("one GPU visible per process", (a, b))):
        print(f"== {label}", flush=True)
        s1, s2 = socket.socketpair()
        procs = []
        for role, s, gpu in (("owner", s1, a), ("peer", s2, b)):
            env = dict(os.environ)
            if vis is None:
                # Put the process's GPU first, so ordinal 0 is its own.
                others = [g for g in (a, b) if g != gpu]
                env["CUDA_VISIBLE_DEVICES"] = ",".join([gpu] + others)
            else:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            procs.append(subprocess.Popen([sys.executable, __file__, role, str(s.fileno())], env=env, pass_fds=[s.fileno()]))
        codes = [p.wait(timeout=120) for p in procs]
        print(f"   exit codes {codes}", flush=True)


if __name__ == "__main__":
    main()
