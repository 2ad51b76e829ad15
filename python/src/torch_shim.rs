//! The fast read of a torch tensor's metadata: torch's exported C shim (`aoti_torch_get_*`, the
//! C functions of libtorch that AOTInductor's generated code calls) on the `at::Tensor` the
//! Python object holds. Seven C calls cost well under a microsecond, against six Python
//! attribute reads per tensor (about 2 us from Rust).
//!
//! Where the `at::Tensor` sits inside the Python object is not a public ABI: torch 2.11 keeps
//! it at byte 16, earlier releases kept a `MaybeOwned<at::Tensor>` there (the tensor at byte
//! 24, or a borrowed one elsewhere). The fast path is taken on torch 2.11 and later only
//! ([`layout_proven`]), the versions it has been checked on; earlier ones use the attributes. So it is found once per process, as the word of a probe tensor's object that equals the
//! handle torch's DLPack capsule carries for the same tensor, and the shim's answers are then
//! checked against the attribute path, on CPU probes at start and on the first CUDA tensor read.
//! Anything unexpected (no shim symbols, no matching word, a disagreement) keeps the attribute
//! path; [`describe`] says which path is in use and why. `MOE_EP_TORCH_SHIM=0` switches the
//! fast path off.
//!
//! Only objects whose type is exactly `torch.Tensor` or `torch.nn.Parameter` take the fast path:
//! subclasses (with `__torch_function__` or `__torch_dispatch__`) go through their attributes.

use libloading::Library;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use std::ffi::c_void;
use std::sync::Mutex;

type GetPtr = unsafe extern "C" fn(*mut c_void, *mut *mut c_void) -> i32;
type GetI32 = unsafe extern "C" fn(*mut c_void, *mut i32) -> i32;
type GetI64 = unsafe extern "C" fn(*mut c_void, *mut i64) -> i32;
type GetDims = unsafe extern "C" fn(*mut c_void, *mut *const i64) -> i32;
type Code = unsafe extern "C" fn() -> i32;

/// A tensor's sizes, inline up to four dimensions (a check allocates nothing on the heap).
pub type Shape = smallvec::SmallVec<[usize; 4]>;

/// What the checks need of a tensor, from either path.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub ptr: u64,
    pub shape: Shape,
    pub dtype: std::borrow::Cow<'static, str>,
    pub is_cuda: bool,
    /// The device's ordinal (-1 on the CPU).
    pub device_index: i64,
    pub contiguous: bool,
}

/// The shim's functions, the tensor's place in the object, and what its codes mean.
struct Shim {
    _lib: Library,
    /// Byte offset of the `at::Tensor` in a tensor's Python object.
    offset: usize,
    /// `torch.Tensor` and `torch.nn.Parameter` (kept alive: compared by address).
    types: [Py<PyAny>; 2],
    data_ptr: GetPtr,
    dtype: GetI32,
    device_type: GetI32,
    device_index: GetI32,
    dim: GetI64,
    sizes: GetDims,
    strides: GetDims,
    /// dtype codes and torch's names for them (the dtypes the extension accepts).
    names: Vec<(i32, &'static str)>,
    cpu: i32,
    cuda: i32,
}

static SHIM: GILOnceCell<Result<Shim, String>> = GILOnceCell::new();
/// Set when a later check finds the fast path wrong: the reason, and the path stays off.
static OFF: Mutex<Option<String>> = Mutex::new(None);
/// Whether `OFF` holds a reason (read on every tensor without taking the lock).
static IS_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Whether a CUDA tensor has been read both ways and agreed.
static CUDA_CHECKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn shim(py: Python<'_>) -> Result<&Shim, String> {
    if IS_OFF.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(OFF.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default());
    }
    if SHIM.get(py).is_none() && !torch_imported(py) {
        // Not cached: the first tensor check after `import torch` sets the shim up.
        return Err("torch is not imported".into());
    }
    SHIM.get_or_init(py, || init(py)).as_ref().map_err(|e| e.clone())
}

/// Whether `torch` is in `sys.modules` (the check never imports it).
fn torch_imported(py: Python<'_>) -> bool {
    py.import("sys").and_then(|s| s.getattr("modules")).and_then(|m| m.contains("torch")).unwrap_or(false)
}

/// Which path reads tensors in this process, and why.
pub fn describe(py: Python<'_>) -> String {
    match shim(py) {
        Ok(s) => format!("torch C shim (at::Tensor at byte {} of the object, checked against the tensor's attributes)", s.offset),
        Err(why) => format!("tensor attributes ({why})"),
    }
}

/// The fast read, or None where it does not apply (or is off): the caller reads attributes.
/// `slow` is the attribute path, used once to check the first CUDA tensor.
pub fn read(t: &Bound<'_, PyAny>, slow: impl FnOnce() -> PyResult<Meta>) -> PyResult<Option<Meta>> {
    let Ok(s) = shim(t.py()) else { return Ok(None) };
    let ty = t.get_type_ptr() as *mut ffi::PyObject;
    if !s.types.iter().any(|p| p.as_ptr() == ty) {
        return Ok(None);
    }
    let Some(m) = s.read(t) else { return Ok(None) };
    if m.is_cuda && !CUDA_CHECKED.load(std::sync::atomic::Ordering::Relaxed) {
        let want = slow()?;
        if want != m {
            *OFF.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("the shim read a CUDA tensor as {m:?}, its attributes say {want:?}"));
            IS_OFF.store(true, std::sync::atomic::Ordering::Relaxed);
            return Ok(Some(want));
        }
        CUDA_CHECKED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(Some(m))
}

/// Whether `t` still has the data pointer and shape it had (`Some`), read through the shim
/// (three C calls, nothing allocated); None where the fast read does not apply.
pub fn same_place(t: &Bound<'_, PyAny>, ptr: u64, shape: &[usize]) -> Option<bool> {
    let s = shim(t.py()).ok()?;
    let ty = t.get_type_ptr() as *mut ffi::PyObject;
    if !s.types.iter().any(|p| p.as_ptr() == ty) {
        return None;
    }
    // SAFETY: as in `Shim::read`: a live torch.Tensor or Parameter object holding its
    // `at::Tensor` at `offset`; the getters only read it.
    unsafe {
        let h = t.as_ptr().cast::<u8>().add(s.offset).cast::<c_void>();
        let (mut nd, mut sz, mut p) = (0i64, std::ptr::null(), std::ptr::null_mut());
        if (s.dim)(h, &mut nd) != 0 || (s.sizes)(h, &mut sz) != 0 || (s.data_ptr)(h, &mut p) != 0 {
            return None;
        }
        if nd as usize != shape.len() {
            return Some(false);
        }
        if nd > 0 && sz.is_null() {
            return None;
        }
        let sizes: &[i64] = if nd == 0 { &[] } else { std::slice::from_raw_parts(sz, shape.len()) };
        Some(p as u64 == ptr && sizes.iter().zip(shape).all(|(&a, &b)| a as usize == b))
    }
}

impl Shim {
    /// The shim's answers for `t`, whose type is exactly torch.Tensor or Parameter.
    fn read(&self, t: &Bound<'_, PyAny>) -> Option<Meta> {
        // SAFETY: `t` is a live torch.Tensor or Parameter object (type checked by the caller or
        // `init`), which holds its `at::Tensor` at `offset` (found and checked in `init`); the
        // shim's getters only read it, and report errors as a non-zero result.
        unsafe {
            let h = t.as_ptr().cast::<u8>().add(self.offset).cast::<c_void>();
            let (mut dt, mut dv, mut di, mut nd) = (0i32, 0i32, 0i32, 0i64);
            let (mut sz, mut st, mut p) = (std::ptr::null(), std::ptr::null(), std::ptr::null_mut());
            let ok = (self.dtype)(h, &mut dt) == 0
                && (self.device_type)(h, &mut dv) == 0
                && (self.device_index)(h, &mut di) == 0
                && (self.dim)(h, &mut nd) == 0
                && (self.sizes)(h, &mut sz) == 0
                && (self.strides)(h, &mut st) == 0
                && (self.data_ptr)(h, &mut p) == 0;
            // Other dtypes take the attribute path, which names them in the error.
            let dtype = self.names.iter().find(|(c, _)| *c == dt)?.1;
            if !ok || !(0..=64).contains(&nd) || (nd > 0 && (sz.is_null() || st.is_null())) {
                return None;
            }
            let n = nd as usize;
            let (sizes, strides) = if n == 0 { (&[][..], &[][..]) } else { (std::slice::from_raw_parts(sz, n), std::slice::from_raw_parts(st, n)) };
            Some(Meta {
                ptr: p as u64,
                shape: sizes.iter().map(|&v| v as usize).collect(),
                dtype: dtype.into(),
                is_cuda: dv == self.cuda,
                device_index: if dv == self.cpu { -1 } else { di as i64 },
                contiguous: contiguous(sizes, strides),
            })
        }
    }
}

/// torch's `is_contiguous()` (the default memory format) from sizes and strides: every
/// dimension of size above 1 has the stride of the dimensions after it; empty tensors are.
pub fn contiguous(sizes: &[i64], strides: &[i64]) -> bool {
    if sizes.contains(&0) {
        return true;
    }
    let mut want = 1i64;
    for (&n, &s) in sizes.iter().zip(strides).rev() {
        if n != 1 {
            if s != want {
                return false;
            }
            want = want.saturating_mul(n);
        }
    }
    true
}

fn init(py: Python<'_>) -> Result<Shim, String> {
    if std::env::var("MOE_EP_TORCH_SHIM").is_ok_and(|v| v == "0") {
        return Err("switched off by MOE_EP_TORCH_SHIM=0".into());
    }
    let e = |what: &str| {
        let what = what.to_string();
        move |err: PyErr| format!("{what}: {err}")
    };
    let torch = py.import("torch").map_err(e("import torch"))?;
    // Where the at::Tensor sits is found and checked below on any torch, but only torch 2.11's
    // layout (a plain at::Tensor) has been read on a GPU; before 2.11 the word may be a
    // MaybeOwned borrow, which this code has not been shown to read safely.
    if !layout_proven(&version(&torch)) {
        return Err(format!("torch {} predates 2.11, whose tensor layout is the only one this fast path has been checked on", version(&torch)));
    }
    let file: String = torch.getattr("__file__").and_then(|f| f.extract()).map_err(e("torch.__file__"))?;
    let lib_path = std::path::Path::new(&file).with_file_name("lib").join("libtorch_cpu.so");
    // SAFETY: torch's own library, which `import torch` has already loaded and initialised:
    // this opens the loaded copy and runs no initialiser again.
    let lib = unsafe { Library::new(&lib_path) }.map_err(|err| format!("opening {}: {err}", lib_path.display()))?;
    macro_rules! sym {
        ($t:ty, $name:literal) => {
            // SAFETY: the C shim's declaration (torch/csrc/inductor/aoti_torch/c/shim.h) is the
            // type given; the pointer is used only while `lib` lives (it lives in the Shim).
            *unsafe { lib.get::<$t>(concat!($name, "\0").as_bytes()) }.map_err(|err| format!("torch has no {}: {err}", $name))?
        };
    }
    let code = |f: Code| -> i32 {
        // SAFETY: the shim's code getters take nothing and return a constant.
        unsafe { f() }
    };
    let names = vec![
        (code(sym!(Code, "aoti_torch_dtype_bfloat16")), "torch.bfloat16"),
        (code(sym!(Code, "aoti_torch_dtype_float32")), "torch.float32"),
        (code(sym!(Code, "aoti_torch_dtype_int64")), "torch.int64"),
        (code(sym!(Code, "aoti_torch_dtype_int32")), "torch.int32"),
        (code(sym!(Code, "aoti_torch_dtype_float8_e4m3fn")), "torch.float8_e4m3fn"),
        (code(sym!(Code, "aoti_torch_dtype_uint8")), "torch.uint8"),
    ];
    let (cpu, cuda) = (code(sym!(Code, "aoti_torch_device_type_cpu")), code(sym!(Code, "aoti_torch_device_type_cuda")));
    let tensor = torch.getattr("Tensor").map_err(e("torch.Tensor"))?;
    let param = torch.getattr("nn").and_then(|m| m.getattr("Parameter")).map_err(e("torch.nn.Parameter"))?;
    let basic: usize = tensor.getattr("__basicsize__").and_then(|b| b.extract()).map_err(e("torch.Tensor.__basicsize__"))?;

    // The at::Tensor's place: the word of a probe's object equal to the TensorImpl pointer of the
    // at::Tensor that torch's DLPack capsule keeps for the same (contiguous) tensor.
    // Probes on the CPU in float32 whatever torch's defaults are (no kernel, nothing captured).
    let cpu_f32 = pyo3::types::PyDict::new(py);
    cpu_f32.set_item("dtype", torch.getattr("float32").map_err(e("torch.float32"))?).map_err(e("a dict"))?;
    cpu_f32.set_item("device", "cpu").map_err(e("a dict"))?;
    let probe = torch.call_method("empty", ((2usize, 3usize),), Some(&cpu_f32)).map_err(e("torch.empty"))?;
    let dl = py.import("torch.utils.dlpack").map_err(e("import torch.utils.dlpack"))?;
    let cap = dl.call_method1("to_dlpack", (&probe,)).map_err(e("to_dlpack"))?;
    // SAFETY: `cap` is a live object; a capsule of another name gives NULL (and an exception,
    // cleared below).
    let m = unsafe { ffi::PyCapsule_GetPointer(cap.as_ptr(), c"dltensor".as_ptr()) };
    if m.is_null() {
        let _ = PyErr::take(py);
        return Err("torch's DLPack capsule is not a \"dltensor\"".into());
    }
    // SAFETY: `m` is a DLManagedTensor (DLPack's ABI): `manager_ctx` follows the 48-byte
    // DLTensor. torch's context is a heap object that starts with the at::Tensor it keeps alive;
    // its first word (the TensorImpl pointer) is read as a number, and is only compared.
    let handle = unsafe {
        let ctx = *m.cast::<u8>().add(48).cast::<*const usize>();
        if ctx.is_null() {
            return Err("torch's DLPack capsule has no manager context".into());
        }
        *ctx
    };
    if handle == 0 {
        return Err("torch's DLPack capsule holds no tensor where expected".into());
    }
    // SAFETY: the object is `basic` bytes long (its type's basic size); words are read as
    // numbers only.
    let matches: Vec<usize> =
        (16..basic.saturating_sub(7)).step_by(8).filter(|&o| unsafe { *probe.as_ptr().cast::<u8>().add(o).cast::<usize>() } == handle).collect();
    let [offset] = matches[..] else {
        return Err(format!(
            "{} words of a torch.Tensor object ({basic} bytes) hold its at::Tensor (torch {}); expected one",
            matches.len(),
            version(&torch)
        ));
    };
    drop(cap);
    let (data_ptr, dtype, device_type, device_index) = (
        sym!(GetPtr, "aoti_torch_get_data_ptr"),
        sym!(GetI32, "aoti_torch_get_dtype"),
        sym!(GetI32, "aoti_torch_get_device_type"),
        sym!(GetI32, "aoti_torch_get_device_index"),
    );
    let (dim, sizes, strides) = (sym!(GetI64, "aoti_torch_get_dim"), sym!(GetDims, "aoti_torch_get_sizes"), sym!(GetDims, "aoti_torch_get_strides"));
    let s = Shim {
        _lib: lib,
        offset,
        types: [tensor.unbind(), param.unbind()],
        data_ptr,
        dtype,
        device_type,
        device_index,
        dim,
        sizes,
        strides,
        names,
        cpu,
        cuda,
    };
    // The shim against the attributes on CPU probes: contiguous, and a strided view with an offset.
    let view = torch
        .call_method("zeros", ((4usize, 6usize),), Some(&cpu_f32))
        .and_then(|z| z.call_method1("to", (torch.getattr("int64")?,)))
        .and_then(|z| z.get_item((pyo3::types::PySlice::new(py, 1, 4, 1), pyo3::types::PySlice::new(py, 0, 6, 2))))
        .map_err(e("a strided probe"))?;
    for p in [&probe, &view] {
        let got = s.read(p);
        let want = crate::tensors::attribute_meta("probe", p).map_err(e("the probe's attributes"))?;
        if got.as_ref() != Some(&want) {
            return Err(format!("the shim reads a probe as {got:?}, its attributes say {want:?}"));
        }
        // The shape agrees (so the shim's dimension count is the strides' length).
        let strides: Vec<i64> = p.call_method0("stride").and_then(|v| v.extract()).map_err(e("stride()"))?;
        // SAFETY: as in `Shim::read` (the probes are plain torch.Tensor objects); the shim's
        // strides hold as many entries as its shape, which equals the probe's.
        let got_strides = unsafe {
            let h = p.as_ptr().cast::<u8>().add(offset).cast::<c_void>();
            let mut st = std::ptr::null();
            ((s.strides)(h, &mut st) == 0 && !st.is_null()).then(|| std::slice::from_raw_parts(st, want.shape.len()).to_vec())
        };
        if got_strides.as_ref() != Some(&strides) {
            return Err(format!("the shim reads a probe's strides as {got_strides:?}, its attributes say {strides:?}"));
        }
    }
    Ok(s)
}

/// `aoti_torch_get_current_cuda_stream`, from torch's CUDA library.
type GetStream = unsafe extern "C" fn(i32, *mut *mut c_void) -> i32;

/// torch's current-stream getter of its CUDA library's C shim, where torch has one.
struct StreamShim {
    _lib: Library,
    get: GetStream,
}

static STREAM: GILOnceCell<Option<StreamShim>> = GILOnceCell::new();
/// Whether the getter has answered as torch's Python does once (`CHECKED`), or differed (`WRONG`:
/// Python's answer is used from then on).
static STREAM_CHECKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static STREAM_WRONG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stream_shim(py: Python<'_>) -> Option<&StreamShim> {
    STREAM
        .get_or_init(py, || {
            if std::env::var("MOE_EP_TORCH_SHIM").is_ok_and(|v| v == "0") || !torch_imported(py) {
                return None;
            }
            let file: String = py.import("torch").and_then(|t| t.getattr("__file__")).and_then(|f| f.extract()).ok()?;
            let path = std::path::Path::new(&file).with_file_name("lib").join("libtorch_cuda.so");
            // SAFETY: torch's own CUDA library, loaded and initialised by `import torch` where
            // it exists: this opens the loaded copy and runs no initialiser again.
            let lib = unsafe { Library::new(&path) }.ok()?;
            // SAFETY: the declaration in torch/csrc/inductor/aoti_torch/c/shim.h (USE_CUDA):
            // `AOTITorchError aoti_torch_get_current_cuda_stream(int32_t, void**)`; the pointer is
            // used only while `lib` lives (it lives in the StreamShim).
            let get = *unsafe { lib.get::<GetStream>(b"aoti_torch_get_current_cuda_stream\0") }.ok()?;
            Some(StreamShim { _lib: lib, get })
        })
        .as_ref()
}

/// torch's current raw CUDA stream of `device` (what `torch.cuda.current_stream(device).cuda_stream`
/// gives on this thread, a capture's stream included): through torch's C shim where it has the
/// getter, one C call, else `python()` (torch's own Python answer). The shim's first answer is
/// checked against `python()`; a difference keeps Python's from then on.
pub fn current_stream(py: Python<'_>, device: i32, python: impl FnOnce() -> PyResult<usize>) -> PyResult<usize> {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(s) = stream_shim(py).filter(|_| !STREAM_WRONG.load(Relaxed)) else { return python() };
    let mut p = std::ptr::null_mut();
    // SAFETY: the shim's getter writes one pointer and reports errors as a non-zero result.
    if unsafe { (s.get)(device, &mut p) } != 0 {
        return python();
    }
    if !STREAM_CHECKED.load(Relaxed) {
        let want = python()?;
        if want != p as usize {
            STREAM_WRONG.store(true, Relaxed);
            return Ok(want);
        }
        STREAM_CHECKED.store(true, Relaxed);
    }
    Ok(p as usize)
}

/// True for the torch versions whose `THPVariable` layout the fast path is proven on: 2.11 and
/// later (a version that does not parse is not).
pub fn layout_proven(version: &str) -> bool {
    let mut parts = version.split(['.', '+', 'a', 'b', 'r']).map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (2, 11),
        _ => false,
    }
}

fn version(torch: &Bound<'_, PyModule>) -> String {
    torch.getattr("__version__").and_then(|v| v.extract::<String>()).unwrap_or_default()
}
