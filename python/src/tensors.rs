//! Torch tensors in (checked, read through the shim or attributes), DLPack views out.

use crate::errors::*;
use crate::torch_shim;
use moe_ep::DeviceArg;
use pyo3::intern;
use pyo3::prelude::*;
use std::ffi::c_void;
use std::marker::PhantomData;

/// What the extension reads of a torch tensor.
pub(crate) type TensorInfo = torch_shim::Meta;

/// The name of a dtype object. torch's dtypes are singletons, so their names are read once
/// and found again by identity (a few dtypes; anything past the cache is read each time).
pub(crate) fn dtype_name(d: &Bound<'_, PyAny>) -> PyResult<String> {
    static SEEN: std::sync::Mutex<Vec<(Py<PyAny>, String)>> = std::sync::Mutex::new(Vec::new());
    let seen = || SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, n)) = seen().iter().find(|(o, _)| o.as_ptr() == d.as_ptr()) {
        return Ok(n.clone());
    }
    // Python runs with the lock released (a `__str__` in Python may switch threads).
    let n = d.str()?.to_string();
    if d.get_type().name().is_ok_and(|t| t == "dtype") {
        let mut s = seen();
        if s.len() < 16 && !s.iter().any(|(o, _)| o.as_ptr() == d.as_ptr()) {
            s.push((d.clone().unbind(), n.clone()));
        }
    }
    Ok(n)
}

/// Reads what [`check`] needs of `t`: through torch's C shim where it applies (see
/// [`torch_shim`]), else through its attributes.
pub(crate) fn tensor_info(name: &str, t: &Bound<'_, PyAny>) -> PyResult<TensorInfo> {
    match torch_shim::read(t, || attribute_meta(name, t))? {
        Some(m) => Ok(m),
        None => attribute_meta(name, t),
    }
}

/// The attribute path: six attribute reads (names interned); strings are built only when the
/// check fails.
pub(crate) fn attribute_meta(name: &str, t: &Bound<'_, PyAny>) -> PyResult<TensorInfo> {
    let py = t.py();
    let not_tensor = |_| invalid(name, format!("expected a torch tensor, got {}", t.get_type().name().map(|n| n.to_string()).unwrap_or_default()));
    Ok(TensorInfo {
        ptr: t.call_method0(intern!(py, "data_ptr")).and_then(|v| v.extract()).map_err(not_tensor)?,
        shape: t.getattr(intern!(py, "shape")).and_then(|s| s.extract::<Vec<usize>>()).map_err(not_tensor)?.into(),
        dtype: t.getattr(intern!(py, "dtype")).and_then(|d| dtype_name(&d)).map_err(not_tensor)?.into(),
        is_cuda: t.getattr(intern!(py, "is_cuda")).and_then(|c| c.extract()).map_err(not_tensor)?,
        device_index: t.call_method0(intern!(py, "get_device")).and_then(|i| i.extract()).map_err(not_tensor)?,
        contiguous: t.call_method0(intern!(py, "is_contiguous")).and_then(|c| c.extract()).map_err(not_tensor)?,
    })
}

/// Checks `t` against what an operation needs: one of `dtypes`, a contiguous CUDA tensor on
/// GPU `device`, and `shape` (`None` entries take any size). Returns what it read.
pub(crate) fn check(name: &str, t: &Bound<'_, PyAny>, dtypes: &[&str], shape: &[Option<usize>], device: i64) -> PyResult<TensorInfo> {
    let i = tensor_info(name, t)?;
    let shape_ok = i.shape.len() == shape.len() && i.shape.iter().zip(shape).all(|(g, w)| w.is_none_or(|w| *g == w));
    if dtypes.contains(&&*i.dtype) && i.is_cuda && i.device_index == device && i.contiguous && shape_ok {
        return Ok(i);
    }
    let want_shape = shape.iter().map(|d| d.map_or("*".to_string(), |v| v.to_string())).collect::<Vec<_>>().join(", ");
    let want = format!("a contiguous {} tensor of shape [{want_shape}] on cuda:{device}", dtypes.join(" or "));
    let place = t.getattr("device").and_then(|d| d.str()).map(|s| s.to_string()).unwrap_or_else(|_| "an unknown device".into());
    let got = format!("a {}{} tensor of shape {:?} on {place}", if i.contiguous { "" } else { "non-contiguous " }, i.dtype, i.shape);
    Err(invalid(name, format!("expected {want}, got {got}")))
}

/// Exposed for tests (and tools): the check every entry point runs on its tensors.
#[pyfunction]
#[pyo3(name = "check_tensor")]
pub(crate) fn check_tensor_py(name: &str, t: &Bound<'_, PyAny>, dtypes: Vec<String>, shape: Vec<Option<usize>>, device: i64) -> PyResult<()> {
    let d: Vec<&str> = dtypes.iter().map(|s| s.as_str()).collect();
    check(name, t, &d, &shape, device).map(|_| ())
}

/// Which path reads torch tensors' metadata in this process (torch's C shim, or the tensors'
/// attributes, with the reason), after setting it up if no tensor was read yet.
#[pyfunction]
pub(crate) fn tensor_path(py: Python<'_>) -> String {
    torch_shim::describe(py)
}

/// Exposed for tests: whether the tensor fast path is taken on torch `version`.
#[pyfunction]
pub(crate) fn _shim_layout_proven(version: &str) -> bool {
    torch_shim::layout_proven(version)
}

/// A checked torch tensor as a device argument.
pub(crate) struct Raw<T> {
    ptr: u64,
    elems: usize,
    _t: PhantomData<T>,
}

impl<T> Raw<T> {
    pub(crate) fn of(i: &TensorInfo) -> Self {
        Raw { ptr: i.ptr, elems: i.shape.iter().product(), _t: PhantomData }
    }
}

// SAFETY: `ptr` is the data of a contiguous CUDA tensor of `elems` elements of `T` on the
// group's GPU (checked by `check`); the Python caller holds the tensor for the call, and the
// operation runs on the caller's stream (torch's current one), on which torch orders the
// tensor's reuse (a tensor from another stream needs `record_stream`, as with any kernel).
unsafe impl<T> DeviceArg<T> for Raw<T> {
    fn device_addr(&self) -> u64 {
        self.ptr
    }
    fn elems(&self) -> usize {
        self.elems
    }
}

// ---------------------------------------------------------------------------------------
// DLPack: views of the buffer's memory as torch tensors (`torch.from_dlpack`)
// ---------------------------------------------------------------------------------------

#[repr(C)]
pub(crate) struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
pub(crate) struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
pub(crate) struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

/// `kDLCUDA`.
pub(crate) const DL_CUDA: i32 = 2;
pub(crate) const DT_U8: DlDataType = DlDataType { code: 1, bits: 8, lanes: 1 };
pub(crate) const DT_I32: DlDataType = DlDataType { code: 0, bits: 32, lanes: 1 };
pub(crate) const DT_F32: DlDataType = DlDataType { code: 2, bits: 32, lanes: 1 };
pub(crate) const DT_BF16: DlDataType = DlDataType { code: 4, bits: 16, lanes: 1 };
pub(crate) const DLTENSOR: &std::ffi::CStr = c"dltensor";

/// What a view keeps alive: its shape array and the buffer object that owns the memory (a
/// strong reference, released by the deleter).
pub(crate) struct ViewCtx {
    shape: Vec<i64>,
    owner: *mut pyo3::ffi::PyObject,
}

/// DLPack's deleter of a view: releases the owner under the GIL, taken through the
/// interpreter's own thread state. Not `Python::with_gil`: torch frees a tensor's storage with
/// the GIL released (`THPVariable_clear`), also when the tensor dies inside one of this
/// extension's calls or deallocations, where pyo3's count of GIL holds says held; a reference
/// dropped there would run (and free the buffer object) without the GIL. At interpreter exit
/// the reference is left.
pub(crate) unsafe extern "C" fn dl_deleter(m: *mut DlManagedTensor) {
    // SAFETY: `m` and its context were made by `dlpack` with `Box::into_raw`, and DLPack calls
    // the deleter once; `owner` is the strong reference `dlpack` took, released once here with
    // the GIL held (`PyGILState_Ensure` takes it whatever this thread's state, and is
    // reentrant where it is already held).
    unsafe {
        let m = Box::from_raw(m);
        let ctx = Box::from_raw(m.manager_ctx as *mut ViewCtx);
        if pyo3::ffi::Py_IsInitialized() != 0 {
            let gil = pyo3::ffi::PyGILState_Ensure();
            pyo3::ffi::Py_DecRef(ctx.owner);
            pyo3::ffi::PyGILState_Release(gil);
        }
    }
}

pub(crate) unsafe extern "C" fn capsule_destructor(cap: *mut pyo3::ffi::PyObject) {
    // SAFETY: a capsule still named "dltensor" was never consumed: its tensor is still ours to
    // delete (a consumer renames it to "used_dltensor").
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(cap, DLTENSOR.as_ptr()) == 1 {
            let m = pyo3::ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()) as *mut DlManagedTensor;
            if let Some(d) = (*m).deleter {
                d(m);
            }
        }
    }
}

/// A DLPack capsule viewing `shape` elements of `dtype` at device address `ptr` of GPU `device`,
/// keeping `owner` alive while the view lives.
pub(crate) fn dlpack(py: Python<'_>, ptr: u64, shape: &[usize], dtype: DlDataType, device: i32, owner: Py<PyAny>) -> PyResult<PyObject> {
    let mut ctx = Box::new(ViewCtx { shape: shape.iter().map(|&d| d as i64).collect(), owner: owner.into_ptr() });
    let m = Box::new(DlManagedTensor {
        dl_tensor: DlTensor {
            data: ptr as *mut c_void,
            device: DlDevice { device_type: DL_CUDA, device_id: device },
            ndim: shape.len() as i32,
            dtype,
            shape: ctx.shape.as_mut_ptr(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        },
        manager_ctx: std::ptr::null_mut(),
        deleter: Some(dl_deleter),
    });
    let m = Box::into_raw(m);
    // SAFETY: `m` is a live allocation; the context box moves into it and is freed by the deleter.
    unsafe { (*m).manager_ctx = Box::into_raw(ctx) as *mut c_void };
    // SAFETY: the capsule takes `m`; its destructor deletes it unless a consumer took it.
    let cap = unsafe { pyo3::ffi::PyCapsule_New(m as *mut c_void, DLTENSOR.as_ptr(), Some(capsule_destructor)) };
    if cap.is_null() {
        // SAFETY: the capsule was not made, so `m` is still ours.
        unsafe { dl_deleter(m) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `cap` is a new reference.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) }.unbind())
}
