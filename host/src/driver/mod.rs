//! The raw CUDA driver layer: every `unsafe` driver call of the library lives here. This file
//! holds the thin result-style wrappers, grouped by topic (as cudarc's `result` module does);
//! [`owners`] holds the RAII owners for what cudarc has no type for: device allocations shared
//! over IPC, peers' allocations mapped over IPC, host-mapped memory and the PTX module.

mod owners;

pub(crate) use owners::{DeviceAlloc, IpcMapping, MappedHost, Module};

use crate::error::Result;
use bytemuck::Pod;
use cudarc::driver::{CudaContext, CudaStream, DriverError, result, sys};
use std::ffi::c_void;

/// True when libcuda can be loaded (without panicking when it cannot).
pub(crate) fn driver_present() -> bool {
    // SAFETY: only probes the dynamic loader.
    unsafe { sys::is_culib_present() }
}

/// CUDA IPC: export and import device allocations between processes.
pub(crate) mod ipc {
    use super::*;

    /// `cuIpcGetMemHandle`: the 64-byte handle of the allocation starting at `ptr`.
    pub(crate) fn get_mem_handle(ptr: u64) -> Result<[u8; 64], DriverError> {
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `h` is a valid out-parameter; `ptr` is checked by the driver.
        unsafe { sys::cuIpcGetMemHandle(&mut h, ptr).result()? };
        Ok(h.reserved.map(|c| c as u8))
    }

    /// `cuIpcOpenMemHandle` (lazy peer access): maps a peer process's allocation here.
    pub(crate) fn open_mem_handle(handle: &[u8; 64]) -> Result<u64, DriverError> {
        let h = sys::CUipcMemHandle_st { reserved: handle.map(|b| b as std::ffi::c_char) };
        let mut ptr = 0u64;
        // SAFETY: `ptr` is a valid out-parameter; the driver validates the handle.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32).result()? };
        Ok(ptr)
    }

    /// `cuIpcCloseMemHandle`.
    ///
    /// # Safety
    /// `ptr` must come from [`open_mem_handle`] and no work may still use it.
    pub(crate) unsafe fn close_mem_handle(ptr: u64) -> Result<(), DriverError> {
        // SAFETY: guaranteed by the caller.
        unsafe { sys::cuIpcCloseMemHandle(ptr).result() }
    }
}

/// Peer access between devices of one process.
pub(crate) mod peer {
    use super::*;

    /// `cuDeviceCanAccessPeer`.
    pub(crate) fn can_access(dev: usize, peer: usize) -> Result<bool, DriverError> {
        let d = result::device::get(dev as i32)?;
        let p = result::device::get(peer as i32)?;
        let mut v = 0;
        // SAFETY: `v` is a valid out-parameter; devices come from the driver.
        unsafe { sys::cuDeviceCanAccessPeer(&mut v, d, p).result()? };
        Ok(v != 0)
    }

    /// `cuDeviceGetUuid_v2`: the UUID of device `ordinal` (the same in every process,
    /// whatever `CUDA_VISIBLE_DEVICES` numbers it).
    pub(crate) fn uuid(ordinal: usize) -> Result<[u8; 16], DriverError> {
        let u = result::device::get_uuid(result::device::get(ordinal as i32)?)?;
        Ok(u.bytes.map(|b| b as u8))
    }

    /// The UUIDs of every device this process sees, by ordinal.
    pub(crate) fn visible_uuids() -> Result<Vec<[u8; 16]>, DriverError> {
        let n = result::device::get_count()?;
        (0..n as usize).map(uuid).collect()
    }

    /// `cuCtxEnablePeerAccess` from `ctx` (bound to this thread) to `peer`'s primary context;
    /// "already enabled" counts as success.
    pub(crate) fn enable(ctx: &CudaContext, peer: &CudaContext) -> Result<(), DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: both contexts are alive (held by the caller).
        let r = unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) };
        match r {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
            e => Err(DriverError(e)),
        }
    }
}

/// `cuCtxGetExecAffinity(CU_EXEC_AFFINITY_TYPE_SM_COUNT)`: the SMs `ctx`'s kernels may use
/// (under CUDA MPS, the client's share of the GPU; otherwise every SM).
pub(crate) fn exec_affinity_sm_count(ctx: &CudaContext) -> Result<u32, DriverError> {
    ctx.bind_to_thread()?;
    let mut p = sys::CUexecAffinityParam_st {
        type_: sys::CUexecAffinityType::CU_EXEC_AFFINITY_TYPE_SM_COUNT,
        param: sys::CUexecAffinityParam_st__bindgen_ty_1 { smCount: sys::CUexecAffinitySmCount_st { val: 0 } },
    };
    // SAFETY: `p` is a valid out-parameter; the context is current on this thread.
    unsafe { sys::cuCtxGetExecAffinity(&mut p, sys::CUexecAffinityType::CU_EXEC_AFFINITY_TYPE_SM_COUNT).result()? };
    // SAFETY: the driver filled the `smCount` member, the one the SM-count type selects.
    Ok(unsafe { p.param.smCount.val })
}

/// `cuFuncGetAttribute`.
pub(crate) fn function_attribute(f: sys::CUfunction, attr: sys::CUfunction_attribute) -> Result<i32, DriverError> {
    // SAFETY: `f` is a live function handle of a loaded module.
    unsafe { result::function::get_function_attribute(f, attr) }
}

/// `cuFuncSetAttribute`.
pub(crate) fn set_function_attribute(f: sys::CUfunction, attr: sys::CUfunction_attribute, v: i32) -> Result<(), DriverError> {
    // SAFETY: `f` is a live function handle of a loaded module.
    unsafe { result::function::set_function_attribute(f, attr, v) }
}

/// `cuLaunchKernel` of a kernel that takes one `#[repr(C)]` parameter block by value.
///
/// # Safety
/// `f` must be a live kernel whose single parameter has the layout of `P` (the PTX check
/// test compares sizes), and every device address inside `params` must stay valid until the
/// kernel has finished.
pub(crate) unsafe fn launch<P: Pod>(
    f: sys::CUfunction,
    grid: u32,
    block: u32,
    smem: u32,
    stream: &CudaStream,
    params: &P,
) -> Result<(), DriverError> {
    let mut p = *params;
    let mut args = [&mut p as *mut P as *mut c_void];
    // SAFETY: guaranteed by the caller; the driver copies the parameter block at launch.
    unsafe { result::launch_kernel(f, (grid, 1, 1), (block, 1, 1), smem, stream.cu_stream(), &mut args) }
}

/// `cuMemsetD8Async`.
///
/// # Safety
/// `[ptr, ptr + bytes)` must be device memory that nothing else uses concurrently.
pub(crate) unsafe fn memset_d8_async(ptr: u64, v: u8, bytes: usize, stream: &CudaStream) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    unsafe { result::memset_d8_async(ptr, v, bytes, stream.cu_stream()) }
}

/// `cuMemcpyDtoDAsync`: `bytes` from device address `src` to device address `dst`, in stream
/// order.
///
/// # Safety
/// Both ranges must be device memory of the stream's context, valid until the copy has run,
/// and `dst` used by nothing else meanwhile.
pub(crate) unsafe fn copy_device_async(dst: u64, src: u64, bytes: usize, stream: &CudaStream) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    unsafe { result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
}

/// Stream-ordered copy of `dst.len()` elements from device address `src` to the host, then a
/// stream synchronisation.
///
/// # Safety
/// `src` must hold `dst.len()` valid `T` values once the stream's earlier work is done.
pub(crate) unsafe fn copy_to_host<T: Pod>(src: u64, dst: &mut [T], stream: &CudaStream) -> Result<(), DriverError> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: guaranteed by the caller; the synchronisation keeps `dst` alive long enough.
    unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream())? };
    stream.synchronize()
}

/// Stream-ordered copy of `src` to device address `dst`, then a stream synchronisation (so
/// `src` may be dropped).
///
/// # Safety
/// `dst` must have room for `src.len()` values.
pub(crate) unsafe fn copy_to_device<T: Pod>(src: &[T], dst: u64, stream: &CudaStream) -> Result<(), DriverError> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: guaranteed by the caller.
    unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream())? };
    stream.synchronize()
}
