//! The NVSHMEM spike (feature `nvshmem`, issue 13; see `docs/internode.md`): NVSHMEM's host
//! library bootstrapped on a [`Group`], and the probe kernels of `cargo xtask build-ptx
//! --nvshmem` bound to it.
//!
//! - `libnvshmem_host.so.3` is opened at run time (`NVSHMEM_HOST_LIB`, else the loader's search
//!   path), like libcuda: a missing library or a version other than the device bitcode's is a
//!   typed [`Error::Nvshmem`], never a crash.
//! - Initialisation by unique id: rank 0 makes it, the group's own exchange carries it, every
//!   rank calls `nvshmemx_hostlib_init_attr` (the shared library's entry; the headers' inline
//!   `nvshmemx_init_attr` needs `libnvshmem_device.a`, which a driver-API module does not link).
//! - The module is loaded with the driver API and bound with `nvshmemx_cumodule_init`.
//! - Drop finalises the module and the library.
//!
//! Every raw call of this module is here; the public API is safe.

use crate::driver::{self, Module};
use crate::error::{Error, Result};
use crate::group::Group;
use cudarc::driver::{CudaStream, sys};
/// The probe kernels' parameter blocks (shared with `kernels/src/nvshmem.rs`).
pub use moe_ep_kernels::abi::{NvshmemPingPongParams, NvshmemPutParams};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::Arc;

/// The NVSHMEM version whose device bitcode `build-ptx --nvshmem` links (the host library must
/// match: `nvshmemx_cumodule_init` refuses a module of another version).
pub const BITCODE_VERSION: (i32, i32, i32) = (3, 8, 0);

/// `NVSHMEMX_INIT_ATTR_INITIALIZER` of NVSHMEM 3.8 (`nvshmemx_init_attr_v2`, 144 bytes), as the
/// wheel's headers lay it out: version words, a null MPI communicator, the v2 argument block
/// with its unique-id arguments (rank and size -1 until set).
const ATTR_INIT: [u8; 144] = {
    let head: [u8; 32] = [144, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 128, 0, 2, 0, 0, 0, 0, 0, 24, 0, 1, 0, 0, 0, 0, 0];
    let mut a = [0u8; 144];
    let mut i = 0;
    while i < 144 {
        a[i] = if i < 32 {
            head[i]
        } else if i >= 40 && i < 52 {
            255
        } else {
            0
        };
        i += 1;
    }
    a
};
/// `nvshmemx_uniqueid_t`: 128 bytes, its first word the version `(1 << 16) + 128`.
const UID_BYTES: usize = 128;
const UID_VERSION: i32 = (1 << 16) + UID_BYTES as i32;
/// `NVSHMEMX_INIT_WITH_UNIQUEID`.
const INIT_WITH_UNIQUEID: c_uint = 1 << 3;

type FnI32 = unsafe extern "C" fn() -> c_int;
type FnVoid = unsafe extern "C" fn();

/// One rank's NVSHMEM: the opened host library, initialised on the group's ranks, with the
/// probe module bound.
pub struct Nvshmem {
    group: Group,
    lib: libloading::Library,
    module: Option<Module>,
    version: (i32, i32, i32),
}

fn err(reason: impl Into<String>) -> Error {
    Error::Nvshmem { reason: reason.into() }
}

impl Nvshmem {
    /// Collective: opens NVSHMEM's host library, checks its version, initialises it on every
    /// rank of `g` by unique id (over the group's exchange), loads `ptx` (the module of
    /// `build-ptx --nvshmem`) and binds NVSHMEM's device state to it.
    pub fn init(g: &Group, ptx: &str) -> Result<Nvshmem> {
        let path = std::env::var("NVSHMEM_HOST_LIB").unwrap_or_else(|_| "libnvshmem_host.so.3".into());
        // SAFETY: loading a shared library runs its initialisers; NVSHMEM's only set up its
        // own state.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| err(format!("cannot open {path} ({e}); install nvidia-nvshmem-cu13 or set NVSHMEM_HOST_LIB")))?;
        let mut nv = Nvshmem { group: g.clone(), lib, module: None, version: (0, 0, 0) };
        let (mut ma, mut mi, mut pa) = (0, 0, 0);
        // SAFETY: `nvshmemx_vendor_get_version_info(int*, int*, int*)` writes three ints.
        unsafe { nv.sym::<unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int)>("nvshmemx_vendor_get_version_info")?(&mut ma, &mut mi, &mut pa) };
        nv.version = (ma, mi, pa);
        if nv.version != BITCODE_VERSION {
            return Err(err(format!(
                "{path} is NVSHMEM {ma}.{mi}.{pa}, but the kernels were linked with NVSHMEM {}.{}.{} device bitcode (the versions must match; set NVSHMEM_HOST_LIB to that version's libnvshmem_host.so.3)",
                BITCODE_VERSION.0, BITCODE_VERSION.1, BITCODE_VERSION.2
            )));
        }
        // The unique id: made by rank 0, carried by the group's exchange.
        let mut uid = [0u8; UID_BYTES];
        uid[..4].copy_from_slice(&UID_VERSION.to_le_bytes());
        if g.rank() == 0 {
            // SAFETY: `nvshmemx_get_uniqueid(nvshmemx_uniqueid_t*)` fills the 128-byte id.
            let rc = unsafe { nv.sym::<unsafe extern "C" fn(*mut c_void) -> c_int>("nvshmemx_get_uniqueid")?(uid.as_mut_ptr() as *mut c_void) };
            check(rc, "nvshmemx_get_uniqueid")?;
        }
        let (ex, timeout) = g.exchange();
        let all = ex.all_gather_as("NVSHMEM unique id", &uid, timeout)?;
        let root: [u8; UID_BYTES] = all[0].as_slice().try_into().map_err(|_| err(format!("rank 0 sent a {}-byte unique id", all[0].len())))?;
        let mut attr = ATTR_INIT;
        let (rank, world) = (g.rank() as c_int, g.world() as c_int);
        // SAFETY: `nvshmemx_set_attr_uniqueid_args(int, int, const nvshmemx_uniqueid_t*,
        // nvshmemx_init_attr_t*)`; `root` and `attr` have the sizes the headers give, and the
        // library keeps a pointer to `root` only until the init below returns.
        let rc = unsafe {
            nv.sym::<unsafe extern "C" fn(c_int, c_int, *const c_void, *mut c_void) -> c_int>("nvshmemx_set_attr_uniqueid_args")?(
                rank,
                world,
                root.as_ptr() as *const c_void,
                attr.as_mut_ptr() as *mut c_void,
            )
        };
        check(rc, "nvshmemx_set_attr_uniqueid_args")?;
        g.context().bind_to_thread().map_err(|e| err(format!("binding the group's context: {e}")))?;
        // SAFETY: `nvshmemx_hostlib_init_attr(unsigned, nvshmemx_init_attr_t*)` with the
        // attributes just filled; collective over the `world` ranks, which all call it here.
        let rc = unsafe {
            nv.sym::<unsafe extern "C" fn(c_uint, *mut c_void) -> c_int>("nvshmemx_hostlib_init_attr")?(
                INIT_WITH_UNIQUEID,
                attr.as_mut_ptr() as *mut c_void,
            )
        };
        check(rc, "nvshmemx_hostlib_init_attr")?;
        // SAFETY: plain queries of the initialised library.
        let (pe, npes) = unsafe { (nv.sym::<FnI32>("nvshmem_my_pe")?(), nv.sym::<FnI32>("nvshmem_n_pes")?()) };
        if (pe, npes) != (rank, world) {
            return Err(err(format!("NVSHMEM made this rank PE {pe} of {npes}, expected {rank} of {world}")));
        }
        let module = Module::load(g.context(), ptx)?;
        // SAFETY: `nvshmemx_cumodule_init(CUmodule)` on a loaded module of this context; the
        // module outlives the binding (finalised in Drop before it is unloaded).
        let rc = unsafe { nv.sym::<unsafe extern "C" fn(sys::CUmodule) -> c_int>("nvshmemx_cumodule_init")?(module.raw()) };
        check(rc, "nvshmemx_cumodule_init (a module of another NVSHMEM version is refused)")?;
        nv.module = Some(module);
        Ok(nv)
    }

    /// The host library's version.
    pub fn version(&self) -> (i32, i32, i32) {
        self.version
    }

    /// A symmetric allocation of `bytes` (`nvshmem_malloc`, collective), zeroed.
    pub fn malloc(&self, bytes: usize) -> Result<SymmetricBuffer<'_>> {
        // SAFETY: `nvshmem_malloc(size_t) -> void*`, collective; every rank calls it here.
        let p = unsafe { self.sym::<unsafe extern "C" fn(usize) -> *mut c_void>("nvshmem_malloc")?(bytes) };
        if p.is_null() {
            return Err(err(format!("nvshmem_malloc({bytes}) failed (the symmetric heap is NVSHMEM_SYMMETRIC_SIZE)")));
        }
        let b = SymmetricBuffer { nv: self, ptr: p as u64, bytes };
        let s = self.group.stream();
        // SAFETY: `p` is a fresh device allocation of `bytes` bytes, unused by anyone yet.
        unsafe { driver::memset_d8_async(b.ptr, 0, bytes, s) }.map_err(|e| err(format!("zeroing a symmetric buffer: {e}")))?;
        s.synchronize().map_err(|e| err(format!("zeroing a symmetric buffer: {e}")))?;
        self.barrier_all()?;
        Ok(b)
    }

    /// `nvshmem_barrier_all` (host, collective) after this rank's stream is idle.
    pub fn barrier_all(&self) -> Result<()> {
        self.group.stream().synchronize().map_err(|e| err(format!("synchronising before a barrier: {e}")))?;
        // SAFETY: a collective host call of the initialised library.
        unsafe { self.sym::<FnVoid>("nvshmem_barrier_all")?() };
        Ok(())
    }

    /// Launches `nvshmem_ping_pong` (one warp) on `stream`.
    pub fn launch_ping_pong(&self, stream: &Arc<CudaStream>, p: &NvshmemPingPongParams) -> Result<()> {
        self.launch("nvshmem_ping_pong", 1, 32, stream, p)
    }

    /// Launches `nvshmem_put_bw` on `stream` with `blocks` blocks of `threads`.
    pub fn launch_put(&self, stream: &Arc<CudaStream>, blocks: u32, threads: u32, p: &NvshmemPutParams) -> Result<()> {
        self.launch("nvshmem_put_bw", blocks, threads, stream, p)
    }

    fn launch<P: bytemuck::Pod>(&self, name: &str, grid: u32, block: u32, stream: &Arc<CudaStream>, p: &P) -> Result<()> {
        let m = self.module.as_ref().ok_or_else(|| err("the module is not bound"))?;
        let f = m.function(name)?;
        // SAFETY: `f` is a kernel of the bound module whose one parameter is `P` (the blocks in
        // `abi::nvshmem` match `kernels/src/nvshmem.rs`); the addresses in `p` are symmetric
        // buffers and device memory the caller keeps until the stream has run the kernel.
        unsafe { driver::launch(f, grid, block, 0, stream, p) }.map_err(|e| err(format!("launching {name}: {e}")))
    }

    /// A function of the host library.
    ///
    /// # Safety
    /// `T` must be the function's C signature.
    unsafe fn sym<T: Copy>(&self, name: &str) -> Result<T> {
        // SAFETY: guaranteed by the caller.
        unsafe { self.lib.get::<T>(name.as_bytes()) }.map(|s| *s).map_err(|e| err(format!("{name} not found in the NVSHMEM host library ({e})")))
    }
}

impl Drop for Nvshmem {
    fn drop(&mut self) {
        // Errors cannot be returned from Drop; each step is attempted once.
        let _ = self.group.stream().synchronize();
        if let Some(m) = self.module.take() {
            // SAFETY: the module was bound by `nvshmemx_cumodule_init`; nothing runs on it.
            if let Ok(f) = unsafe { self.sym::<unsafe extern "C" fn(sys::CUmodule) -> c_int>("nvshmemx_cumodule_finalize") } {
                // SAFETY: as above.
                unsafe { f(m.raw()) };
            }
            drop(m);
            // SAFETY: collective finalisation; every rank drops its `Nvshmem` in the same place.
            if let Ok(f) = unsafe { self.sym::<FnVoid>("nvshmemx_hostlib_finalize") } {
                // SAFETY: as above.
                unsafe { f() };
            }
        }
    }
}

/// A symmetric allocation (`nvshmem_malloc`), freed (`nvshmem_free`, collective) on drop.
pub struct SymmetricBuffer<'a> {
    nv: &'a Nvshmem,
    ptr: u64,
    bytes: usize,
}

impl SymmetricBuffer<'_> {
    /// The device address (the same offset in every rank's symmetric heap).
    pub fn device_addr(&self) -> u64 {
        self.ptr
    }
    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for SymmetricBuffer<'_> {
    fn drop(&mut self) {
        let _ = self.nv.group.stream().synchronize();
        // SAFETY: `ptr` came from `nvshmem_malloc` and is freed once, collectively.
        if let Ok(f) = unsafe { self.nv.sym::<unsafe extern "C" fn(*mut c_void)>("nvshmem_free") } {
            // SAFETY: as above; the stream that used it is idle.
            unsafe { f(self.ptr as *mut c_void) };
        }
    }
}

fn check(rc: c_int, what: &str) -> Result<()> {
    if rc != 0 { Err(err(format!("{what} returned {rc}"))) } else { Ok(()) }
}
