"""Probe (GPU machine, torch installed): can a native extension read a torch tensor's metadata
through torch's exported C shim (aoti_torch_get_*) from the Python object's handle, and is the
handle where we think it is (checked against the handle DLPack's capsule carries)? Prints each
check and the time per read against the attribute path."""

import ctypes
import os
import time

import torch

print("torch", torch.__version__, "basicsize", torch.Tensor.__basicsize__, "cuda", torch.cuda.is_available())
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
names = [
    "aoti_torch_get_data_ptr",
    "aoti_torch_get_dtype",
    "aoti_torch_get_device_type",
    "aoti_torch_get_device_index",
    "aoti_torch_get_dim",
    "aoti_torch_get_sizes",
    "aoti_torch_get_strides",
    "aoti_torch_dtype_bfloat16",
    "aoti_torch_dtype_float32",
    "aoti_torch_dtype_int64",
    "aoti_torch_dtype_int32",
    "aoti_torch_dtype_float8_e4m3fn",
    "aoti_torch_dtype_uint8",
    "aoti_torch_device_type_cuda",
    "aoti_torch_device_type_cpu",
]
for n in names:
    print(n, "found" if hasattr(lib, n) else "MISSING")
for n in names[7:]:
    f = getattr(lib, n)
    f.restype = ctypes.c_int32
    print(n, "=", f())

get_ptr = ctypes.PyDLL(None).PyCapsule_GetPointer if False else ctypes.pythonapi.PyCapsule_GetPointer
get_ptr.restype = ctypes.c_void_p
get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]


def words(t):
    return [ctypes.c_uint64.from_address(id(t) + off).value for off in range(16, torch.Tensor.__basicsize__, 8)]


OFFSET = None


def handle(t):
    return id(t) + OFFSET


def impl_of_dlpack(t):
    cap = torch.utils.dlpack.to_dlpack(t)
    p = get_ptr(cap, b"dltensor")
    mctx = ctypes.c_uint64.from_address(p + 48).value
    return ctypes.c_uint64.from_address(mctx).value


def shim(t):
    h = ctypes.c_void_p(handle(t))
    d = ctypes.c_void_p()
    assert lib.aoti_torch_get_data_ptr(h, ctypes.byref(d)) == 0
    dt, dv, di = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
    assert lib.aoti_torch_get_dtype(h, ctypes.byref(dt)) == 0
    assert lib.aoti_torch_get_device_type(h, ctypes.byref(dv)) == 0
    assert lib.aoti_torch_get_device_index(h, ctypes.byref(di)) == 0
    nd = ctypes.c_int64()
    assert lib.aoti_torch_get_dim(h, ctypes.byref(nd)) == 0
    sz, st = ctypes.POINTER(ctypes.c_int64)(), ctypes.POINTER(ctypes.c_int64)()
    assert lib.aoti_torch_get_sizes(h, ctypes.byref(sz)) == 0
    assert lib.aoti_torch_get_strides(h, ctypes.byref(st)) == 0
    return d.value or 0, dt.value, dv.value, di.value, [sz[i] for i in range(nd.value)], [st[i] for i in range(nd.value)]


probe = torch.empty((2, 3))
impl = None
try:
    impl = impl_of_dlpack(probe)
except Exception as e:
    print("dlpack read failed:", e, flush=True)
print("object words from offset 16:", [hex(w) for w in words(probe)], "dlpack handle's impl:", hex(impl or 0), flush=True)
for off, w in zip(range(16, torch.Tensor.__basicsize__, 8), words(probe)):
    if w == impl:
        OFFSET = off
print("offset of the at::Tensor in the object:", OFFSET, flush=True)
if OFFSET is None:
    raise SystemExit("no word of the object equals the DLPack handle's TensorImpl")

dev = "cuda" if torch.cuda.is_available() else "cpu"
cases = [
    torch.empty((2, 3)),
    torch.empty((4, 7168), dtype=torch.bfloat16, device=dev),
    torch.empty((4, 8), dtype=torch.int64, device=dev)[1:],
    torch.empty((8, 4), dtype=torch.float32, device=dev).t(),
    torch.nn.Parameter(torch.empty((3, 5), device=dev)),
]
for t in cases:
    word = ctypes.c_uint64.from_address(handle(t)).value
    same = word == impl_of_dlpack(t.contiguous() if not t.is_contiguous() else t) if t.is_contiguous() else None
    got = shim(t)
    want = (t.data_ptr(), None, None, t.get_device() if t.is_cuda else -1, list(t.shape), list(t.stride()))
    ok = got[0] == want[0] and got[4] == want[4] and got[5] == want[5] and (not t.is_cuda or got[3] == want[3])
    print(type(t).__name__, t.dtype, t.device, "handle==dlpack:", same, "shim:", got[1:4], "agrees:", ok, flush=True)

x = cases[1]
n = 100000
t0 = time.perf_counter()
for _ in range(n):
    shim(x)
print("ctypes shim read (7 calls, ctypes overhead included): %.3f us" % ((time.perf_counter() - t0) / n * 1e6))
t0 = time.perf_counter()
for _ in range(n):
    (x.data_ptr(), x.shape, x.dtype, x.is_cuda, x.get_device(), x.is_contiguous())
print("attribute path: %.3f us" % ((time.perf_counter() - t0) / n * 1e6))
