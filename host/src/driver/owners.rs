//! RAII owners of driver objects cudarc has no type for. Each frees what it owns on drop,
//! with its context bound, ignoring errors (drops never panic).

use super::ipc;
use crate::error::{DriverContext, Result};
use cudarc::driver::{CudaContext, DriverError, result, sys};
use std::ffi::{CString, c_void};
use std::sync::Arc;

/// A device allocation owned by this rank (`cuMemAlloc`), freed on drop.
pub(crate) struct DeviceAlloc {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceAlloc {
    /// Allocates `bytes` (at least 1) and zeroes them.
    pub(crate) fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().during("cuCtxSetCurrent", || "allocating device memory".into())?;
        // SAFETY: plain allocation; freed in Drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.during("cuMemAlloc", || format!("allocating {bytes} bytes"))?;
        let a = DeviceAlloc { ptr, bytes, ctx: ctx.clone() };
        // Zeroed on a stream of its own, and only that stream is waited for (a context
        // synchronisation would also wait for every other stream: torch's, NCCL's).
        let s = ctx.new_stream().during("cuStreamCreate", || "zeroing a new allocation".into())?;
        // SAFETY: `ptr` holds `bytes` bytes, used by nothing else yet.
        unsafe { result::memset_d8_async(ptr, 0, bytes.max(1), s.cu_stream()) }.during("cuMemsetD8Async", || "zeroing a new allocation".into())?;
        s.synchronize().during("cuStreamSynchronize", || "zeroing a new allocation".into())?;
        Ok(a)
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // Errors cannot be returned from Drop; a failed free leaks (never panics).
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `malloc_sync` and is freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Pinned host memory mapped into the device's address space (`cuMemHostAlloc` with
/// `DEVICEMAP`): kernels store to it, the host polls it without a stream synchronisation.
pub(crate) struct MappedHost {
    host: *mut u32,
    dev: u64,
    words: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the memory is owned by this value; concurrent access goes through volatile reads
// and writes of whole words, which is what polling device-written memory needs.
unsafe impl Send for MappedHost {}
// SAFETY: as above; no `&mut` aliasing is ever handed out.
unsafe impl Sync for MappedHost {}

impl MappedHost {
    pub(crate) fn new(ctx: &Arc<CudaContext>, words: usize) -> Result<Self> {
        ctx.bind_to_thread().during("cuCtxSetCurrent", || "allocating mapped host memory".into())?;
        let bytes = words.max(1) * 4;
        // SAFETY: plain allocation; freed in Drop.
        let host = unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .during("cuMemHostAlloc", || format!("allocating {bytes} bytes of mapped host memory"))? as *mut u32;
        let mut dev = 0u64;
        // SAFETY: `host` was just allocated with DEVICEMAP.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut c_void, 0).result() };
        let m = MappedHost { host, dev, words: words.max(1), ctx: ctx.clone() };
        r.during("cuMemHostGetDevicePointer", || "mapping host memory".into())?;
        for i in 0..m.words {
            m.write(i, 0);
        }
        Ok(m)
    }

    /// Device address of word 0.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.dev
    }

    /// Volatile read of word `i`, then an acquire fence (so later reads see what the device
    /// wrote before publishing word `i`).
    pub(crate) fn read(&self, i: usize) -> u32 {
        assert!(i < self.words);
        // SAFETY: `i` is in bounds of the allocation.
        let v = unsafe { std::ptr::read_volatile(self.host.add(i)) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        v
    }

    /// Volatile write of word `i`.
    pub(crate) fn write(&self, i: usize, v: u32) {
        assert!(i < self.words);
        // SAFETY: `i` is in bounds of the allocation.
        unsafe { std::ptr::write_volatile(self.host.add(i), v) };
    }
}

impl Drop for MappedHost {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_host`, freed once.
            let _ = unsafe { result::free_host(self.host as *mut c_void) };
        }
    }
}

/// A loaded PTX module (`cuModuleLoadData`), unloaded on drop.
pub(crate) struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUmodule handle may be used from any thread once its context is current.
unsafe impl Send for Module {}
// SAFETY: as above; the module is immutable after load.
unsafe impl Sync for Module {}

impl Module {
    /// JIT-compiles `ptx` for the context's device.
    pub(crate) fn load(ctx: &Arc<CudaContext>, ptx: &str) -> Result<Self> {
        ctx.bind_to_thread().during("cuCtxSetCurrent", || "loading the kernels".into())?;
        let src = CString::new(ptx).expect("PTX has no NUL bytes");
        // SAFETY: `src` is a NUL-terminated PTX image that outlives the call.
        let raw = unsafe { result::module::load_data(src.as_ptr() as *const c_void) }
            .during("cuModuleLoadData", || "JIT-compiling the moe-ep PTX module (needs a driver for CUDA 13.0 or newer and an sm_90 GPU)".into())?;
        Ok(Module { raw, ctx: ctx.clone() })
    }

    /// Loads a compiled image (a cubin for the context's device): no JIT.
    #[cfg_attr(not(feature = "nvshmem"), allow(dead_code))]
    pub(crate) fn load_image(ctx: &Arc<CudaContext>, image: &[u8]) -> Result<Self> {
        ctx.bind_to_thread().during("cuCtxSetCurrent", || "loading a module".into())?;
        // SAFETY: `image` is an ELF cubin (the caller checked its magic) that outlives the call;
        // the driver copies what it keeps.
        let raw = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .during("cuModuleLoadData", || "loading a cubin (built for sm_90)".into())?;
        Ok(Module { raw, ctx: ctx.clone() })
    }

    /// The module handle (for libraries that bind their device state to a module, such as
    /// NVSHMEM's `nvshmemx_cumodule_init`); valid while `self` lives.
    #[cfg_attr(not(feature = "nvshmem"), allow(dead_code))]
    pub(crate) fn raw(&self) -> sys::CUmodule {
        self.raw
    }

    /// `cuModuleGetFunction`.
    pub(crate) fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let c = CString::new(name).expect("kernel names have no NUL bytes");
        // SAFETY: the module is loaded; the handle lives as long as `self`.
        unsafe { result::module::get_function(self.raw, c) }.during("cuModuleGetFunction", || format!("looking up kernel `{name}`"))
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: loaded by `load`, unloaded once, after every function handle's owner.
            let _ = unsafe { result::module::unload(self.raw) };
        }
    }
}

/// A peer process's allocation mapped into this process over CUDA IPC
/// (`cuIpcOpenMemHandle`), closed on drop (`cuIpcCloseMemHandle`). Drop it only once no work
/// of this process may still use the mapping.
pub(crate) struct IpcMapping {
    ptr: u64,
    ctx: Arc<CudaContext>,
}

impl IpcMapping {
    /// Maps the allocation behind `handle` into `ctx`.
    pub(crate) fn open(ctx: &Arc<CudaContext>, handle: &[u8; 64]) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        Ok(IpcMapping { ptr: ipc::open_mem_handle(handle)?, ctx: ctx.clone() })
    }

    /// Device address of the mapping in this process.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `open_mem_handle` and is closed once; the owner drops the
            // mapping only after its users are done (see the type's documentation).
            let _ = unsafe { ipc::close_mem_handle(self.ptr) };
        }
    }
}
