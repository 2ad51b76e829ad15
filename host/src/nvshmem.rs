//! The NVSHMEM spike (feature `nvshmem`, issue 13; see `docs/internode.md`): NVSHMEM's host
//! library bootstrapped on a [`Group`], and the probe kernels of `cargo xtask build-ptx
//! --nvshmem` bound to it.
//!
//! - `libnvshmem_host.so.3` is opened at run time (`NVSHMEM_HOST_LIB`, else the loader's search
//!   path), like libcuda: a missing library, or a version older than the device bitcode's or of
//!   another major version, is a typed [`Error::Nvshmem`], never a crash.
//! - An NVSHMEM that the process has already initialised (an engine's DeepEP, torch's symmetric
//!   memory) is reused, never initialised twice: its PEs must be the group's ranks, and it is left
//!   for its owner to finalise.
//! - Initialisation by unique id: rank 0 makes it, the group's own exchange carries it, every
//!   rank calls `nvshmemx_hostlib_init_attr` (the shared library's entry; the headers' inline
//!   `nvshmemx_init_attr` needs `libnvshmem_device.a`, which a driver-API module does not link).
//! - The module is loaded with the driver API and bound with `nvshmemx_cumodule_init`.
//! - `Nvshmem::finalize` (collective) releases the module and the library; a drop runs no
//!   collective and leaves NVSHMEM set up until the process ends.
//!
//! Every raw call of this module is here; the public API is safe.

use crate::driver::{self, Module};
use crate::error::{Error, Result};
use crate::group::{Group, Kernel};
use cudarc::driver::{CudaStream, sys};
/// The probe kernels' parameter blocks (shared with `kernels/src/nvshmem.rs`).
pub use moe_ep_kernels::abi::{NvshmemPingPongParams, NvshmemPutParams};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::Arc;

/// The NVSHMEM version whose device bitcode `build-ptx --nvshmem` links: the oldest host
/// library accepted. `nvshmemx_cumodule_init` takes a module of the host library's major version
/// whose minor is not newer than the library's, so any 3.x from this one on loads it.
pub const BITCODE_VERSION: (i32, i32, i32) = (3, 4, 5);

/// Whether a host library of `version` can bind a module of [`BITCODE_VERSION`]: the same major
/// version, and not older.
pub fn host_version_supported(version: (i32, i32, i32)) -> bool {
    version.0 == BITCODE_VERSION.0 && version >= BITCODE_VERSION
}

/// `NVSHMEMX_INIT_ATTR_INITIALIZER` of NVSHMEM 3.4 (`nvshmemx_init_attr_v1`, 144 bytes), as
/// that version's headers lay it out: the attribute's version word `(1 << 16) + 144`, a null
/// MPI communicator at byte 8, the argument block at byte 16 (version `(1 << 16) + 128`) whose
/// unique-id arguments start at byte 24 (version `(1 << 16) + 24`, a null id pointer, rank and
/// size -1 until set). A newer 3.x host library reads this older layout by its version words.
const ATTR_INIT: [u8; 144] = {
    let head: [u8; 32] = [144, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 128, 0, 1, 0, 0, 0, 0, 0, 24, 0, 1, 0, 0, 0, 0, 0];
    let mut a = [0u8; 144];
    let mut i = 0;
    while i < 144 {
        a[i] = if i < 32 {
            head[i]
        } else if i >= 40 && i < 48 {
            255
        } else {
            0
        };
        i += 1;
    }
    a
};
/// `nvshmemx_init_status_t`: `NVSHMEM_STATUS_IS_INITIALIZED` and later states mean the process
/// has an initialised NVSHMEM (3 and 4: the limited and full multi-process-per-GPU modes).
const STATUS_IS_INITIALIZED: c_int = 2;
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
    /// The bound module's `ll_dispatch` and `ll_combine` (the put path), each as its function
    /// handle's address and thread limit, looked up once when it is bound; None without them.
    ll: Option<[(usize, u32); 2]>,
    version: (i32, i32, i32),
    /// Whether this value initialised the library (and so finalises it); false when the process
    /// had already initialised it.
    owns_init: bool,
    /// `nvshmemx_init_status()` once initialised.
    status: i32,
}

fn err(reason: impl Into<String>) -> Error {
    Error::Nvshmem { reason: reason.into() }
}

impl Nvshmem {
    /// Collective: opens NVSHMEM's host library, checks its version, initialises it on every
    /// rank of `g` by unique id (over the group's exchange) unless the process already has,
    /// loads `image` (the module of `build-ptx --nvshmem`: its sm_90 cubin, or its PTX text) and
    /// binds NVSHMEM's device state to it. Without an image only the host library is set up
    /// (enough for buffers in NVSHMEM's memory, [`crate::ll::LlBuffer::with_nvshmem`], whose
    /// kernels store directly).
    ///
    /// All or nothing: after each step whose failure is local (opening the library, its
    /// version, the unique id, loading and binding the module) the ranks agree on success, so a
    /// failure anywhere is an error on every rank, naming the ranks that failed, and no rank is
    /// left in a collective call the others never make. An initialisation made here and then
    /// refused is finalised again, by every rank.
    pub fn init(g: &Group, image: Option<&[u8]>) -> Result<Nvshmem> {
        let opened = Self::open(g);
        // Every rank learns every rank's state: 0 failed, 1 to initialise, 2 initialised before.
        let code = match &opened {
            Err(_) => 0u8,
            Ok(nv) => 1 + (nv.status >= STATUS_IS_INITIALIZED) as u8,
        };
        let codes = agree(g, "NVSHMEM opened", code)?;
        let mut nv = match (opened, ranks_where(&codes, |c| c == 0)) {
            (Err(e), _) => return Err(e),
            (Ok(_), failed) if !failed.is_empty() => return Err(err(format!("ranks {failed:?} could not open a usable NVSHMEM host library"))),
            (Ok(nv), _) => nv,
        };
        let reuse = code == 2;
        if codes.iter().any(|&c| c != code) {
            return Err(err(format!(
                "NVSHMEM was initialised before in the processes of ranks {:?} but not in the others': reuse it on every rank or on none",
                ranks_where(&codes, |c| c == 2)
            )));
        }
        // Every rank reaches the agreement below whatever failed before it (the initialisation's
        // own steps fail on every rank together, its collective call on any), and from there a
        // refusal finalises (collectively) what this call initialised.
        let inited = if reuse { Ok(()) } else { nv.init_by_unique_id(g) };
        let bound = inited.and_then(|_| nv.check_pes(g)).and_then(|_| nv.bind(g, image));
        match all_ok(g, "setting NVSHMEM up", bound) {
            Ok(()) => Ok(nv),
            Err(e) => {
                nv.finalize_owned();
                Err(e)
            }
        }
    }

    /// Opens the host library and checks its version (this rank only).
    fn open(g: &Group) -> Result<Nvshmem> {
        let path = std::env::var("NVSHMEM_HOST_LIB").unwrap_or_else(|_| "libnvshmem_host.so.3".into());
        // SAFETY: loading a shared library runs its initialisers; NVSHMEM's only set up its
        // own state.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| err(format!("cannot open {path} ({e}); install nvidia-nvshmem-cu13 or set NVSHMEM_HOST_LIB")))?;
        let mut nv = Nvshmem { group: g.clone(), lib, module: None, ll: None, version: (0, 0, 0), owns_init: false, status: 0 };
        let (mut ma, mut mi, mut pa) = (0, 0, 0);
        // SAFETY: `nvshmemx_vendor_get_version_info(int*, int*, int*)` writes three ints.
        unsafe { nv.sym::<unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int)>("nvshmemx_vendor_get_version_info")?(&mut ma, &mut mi, &mut pa) };
        nv.version = (ma, mi, pa);
        if !host_version_supported(nv.version) {
            return Err(err(format!(
                "{path} is NVSHMEM {ma}.{mi}.{pa}, but the kernels were linked with NVSHMEM {}.{}.{} device bitcode: the host library must be {}.x and at least that version (set NVSHMEM_HOST_LIB to such a libnvshmem_host.so.3)",
                BITCODE_VERSION.0, BITCODE_VERSION.1, BITCODE_VERSION.2, BITCODE_VERSION.0
            )));
        }
        // SAFETY: `nvshmemx_init_status(void) -> int`, callable before initialisation.
        nv.status = unsafe { nv.sym::<FnI32>("nvshmemx_init_status")?() };
        Ok(nv)
    }

    /// This rank's PE must be its rank in `g` (this rank only).
    fn check_pes(&mut self, g: &Group) -> Result<()> {
        // SAFETY: plain queries of the initialised library.
        self.status = unsafe { self.sym::<FnI32>("nvshmemx_init_status")?() };
        // SAFETY: as above.
        let (pe, npes) = unsafe { (self.sym::<FnI32>("nvshmem_my_pe")?(), self.sym::<FnI32>("nvshmem_n_pes")?()) };
        if (pe as usize, npes as usize) != (g.rank(), g.world()) {
            return Err(err(format!(
                "NVSHMEM {} this rank PE {pe} of {npes}, expected {} of {} (the group's rank order)",
                if self.owns_init { "made" } else { "(initialised before) has" },
                g.rank(),
                g.world()
            )));
        }
        Ok(())
    }

    /// Loads `image` and binds NVSHMEM's device state to it (this rank only).
    fn bind(&mut self, g: &Group, image: Option<&[u8]>) -> Result<()> {
        let Some(image) = image else { return Ok(()) };
        let module = if image.starts_with(b"\x7fELF") {
            Module::load_image(g.context(), image)?
        } else {
            let text = std::str::from_utf8(image).map_err(|_| err("the NVSHMEM module is neither a cubin (ELF) nor PTX text"))?;
            Module::load(g.context(), text)?
        };
        // SAFETY: `nvshmemx_cumodule_init(CUmodule)` on a loaded module of this context; the
        // module outlives the binding (finalised before it is unloaded).
        let rc = unsafe { self.sym::<unsafe extern "C" fn(sys::CUmodule) -> c_int>("nvshmemx_cumodule_init")?(module.raw()) };
        check(rc, "nvshmemx_cumodule_init (a module of a newer NVSHMEM minor version, or another major one, is refused)")?;
        let ll_kernel = |k: Kernel| -> Option<(usize, u32)> {
            let f = module.function(k.name()).ok()?;
            let threads = driver::function_attribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK).ok()?;
            Some((f as usize, threads as u32))
        };
        self.ll = ll_kernel(Kernel::LlDispatch).zip(ll_kernel(Kernel::LlCombine)).map(|(d, c)| [d, c]);
        self.module = Some(module);
        Ok(())
    }

    /// Initialises the host library on every rank of `g` by unique id (made by rank 0, carried
    /// by the group's exchange; a rank 0 that cannot make one sends none, and every rank fails).
    fn init_by_unique_id(&mut self, g: &Group) -> Result<()> {
        let mut uid = [0u8; UID_BYTES];
        uid[..4].copy_from_slice(&UID_VERSION.to_le_bytes());
        let mut made = Ok(());
        if g.rank() == 0 {
            // SAFETY: the C signature of `nvshmemx_get_uniqueid`.
            let f = unsafe { self.sym::<unsafe extern "C" fn(*mut c_void) -> c_int>("nvshmemx_get_uniqueid") };
            made = f.and_then(|f| {
                // SAFETY: `nvshmemx_get_uniqueid(nvshmemx_uniqueid_t*)` fills the 128-byte id.
                check(unsafe { f(uid.as_mut_ptr() as *mut c_void) }, "nvshmemx_get_uniqueid")
            });
        }
        let (ex, timeout) = g.exchange();
        let mine: &[u8] = if made.is_ok() { &uid } else { &[] };
        let all = ex.all_gather_as("NVSHMEM unique id", mine, timeout)?;
        made?;
        let (rank, world) = (g.rank() as c_int, g.world() as c_int);
        let root: [u8; UID_BYTES] =
            all[0].as_slice().try_into().map_err(|_| err(format!("rank 0 could not make an NVSHMEM unique id ({} bytes came)", all[0].len())))?;
        let mut attr = ATTR_INIT;
        // SAFETY: the C signature of `nvshmemx_set_attr_uniqueid_args`.
        let f = unsafe { self.sym::<unsafe extern "C" fn(c_int, c_int, *const c_void, *mut c_void) -> c_int>("nvshmemx_set_attr_uniqueid_args") };
        let set = f
            .and_then(|f| {
                // SAFETY: `(int, int, const nvshmemx_uniqueid_t*, nvshmemx_init_attr_t*)`;
                // `root` and `attr` have the sizes the headers give, and the library keeps a
                // pointer to `root` only until the init below returns.
                check(unsafe { f(rank, world, root.as_ptr() as *const c_void, attr.as_mut_ptr() as *mut c_void) }, "nvshmemx_set_attr_uniqueid_args")
            })
            .and_then(|_| g.context().bind_to_thread().map_err(|e| err(format!("binding the group's context: {e}"))));
        // Nobody enters the collective initialisation unless everybody can.
        all_ok(g, "preparing NVSHMEM's initialisation", set)?;
        // SAFETY: `nvshmemx_hostlib_init_attr(unsigned, nvshmemx_init_attr_t*)` with the
        // attributes just filled; collective over the `world` ranks, which all call it here.
        let rc = unsafe {
            self.sym::<unsafe extern "C" fn(c_uint, *mut c_void) -> c_int>("nvshmemx_hostlib_init_attr")?(
                INIT_WITH_UNIQUEID,
                attr.as_mut_ptr() as *mut c_void,
            )
        };
        check(rc, "nvshmemx_hostlib_init_attr")?;
        self.owns_init = true;
        Ok(())
    }

    /// Collective: releases the module and, where this value initialised NVSHMEM, finalises
    /// it. Every rank calls it at the same point, once no buffer uses NVSHMEM's memory (an
    /// `Arc` still held by a buffer is an error naming that, and nothing is released). Dropping
    /// an `Nvshmem` instead finalises nothing (finalising is collective): NVSHMEM then stays set
    /// up until the process ends.
    pub fn finalize(self: Arc<Self>) -> Result<()> {
        let mut nv = Arc::try_unwrap(self).map_err(|a| {
            err(format!("finalize: {} more holders of this NVSHMEM (buffers in its memory: destroy them first)", Arc::strong_count(&a) - 1))
        })?;
        nv.finalize_owned();
        Ok(())
    }

    /// The module's binding and, where owned, the library: released once.
    fn finalize_owned(&mut self) {
        let _ = self.group.stream().synchronize();
        self.release_module();
        if std::mem::take(&mut self.owns_init) {
            // SAFETY: collective finalisation of the initialisation this value made; every rank
            // reaches it at the same point (`finalize`, or `init` after agreeing on a failure).
            if let Ok(f) = unsafe { self.sym::<FnVoid>("nvshmemx_hostlib_finalize") } {
                // SAFETY: as above.
                unsafe { f() };
            }
        }
    }

    fn release_module(&mut self) {
        self.ll = None;
        if let Some(m) = self.module.take() {
            // SAFETY: the module was bound by `nvshmemx_cumodule_init`; nothing runs on it (the
            // caller synchronised this rank's stream).
            if let Ok(f) = unsafe { self.sym::<unsafe extern "C" fn(sys::CUmodule) -> c_int>("nvshmemx_cumodule_finalize") } {
                // SAFETY: as above.
                unsafe { f(m.raw()) };
            }
        }
    }

    /// The host library's version.
    pub fn version(&self) -> (i32, i32, i32) {
        self.version
    }

    /// `nvshmemx_init_status()` after initialisation: 2 initialised, 3 initialised in NVSHMEM's
    /// limited multi-process-per-GPU mode (several PEs on one GPU without MPS), 4 the full one.
    pub fn init_status(&self) -> i32 {
        self.status
    }

    /// Whether this value initialised NVSHMEM (false: the process had, and keeps it).
    pub fn owns_init(&self) -> bool {
        self.owns_init
    }

    /// Kernel `k` of the bound module (the low-latency kernels with their put path) and its
    /// thread limit (the NVSHMEM module's kernels take more registers than the default ones).
    pub(crate) fn kernel(&self, k: Kernel) -> Result<(sys::CUfunction, u32)> {
        let ll =
            self.ll.ok_or_else(|| err(format!("{} needs the NVSHMEM module (Nvshmem::init with the image of build-ptx --nvshmem)", k.name())))?;
        let (f, threads) = match k {
            Kernel::LlDispatch => ll[0],
            Kernel::LlCombine => ll[1],
            _ => return Err(err(format!("{} is not in the NVSHMEM module", k.name()))),
        };
        Ok((f as sys::CUfunction, threads))
    }

    /// `nvshmem_ptr(addr, pe)`: the address at which this rank can load and store `pe`'s copy
    /// of the symmetric address `addr` directly (same node, peer access), or `None`.
    pub fn direct_ptr(&self, addr: u64, pe: usize) -> Result<Option<u64>> {
        // SAFETY: `nvshmem_ptr(const void*, int) -> void*`, a host query that reads no memory.
        let p = unsafe { self.sym::<unsafe extern "C" fn(*const c_void, c_int) -> *mut c_void>("nvshmem_ptr")?(addr as *const c_void, pe as c_int) };
        Ok((!p.is_null()).then_some(p as u64))
    }

    /// Collective: a moe-ep symmetric heap of `bytes` per rank in NVSHMEM's symmetric memory
    /// (`nvshmem_malloc`), zeroed on every rank. Each peer's copy is reached at its
    /// `nvshmem_ptr` where NVSHMEM maps it (same node); a PE it does not map (another node),
    /// or every other PE with `MOE_EP_NVSHMEM_PUT=all`, is reached through NVSHMEM calls by
    /// the bound module's kernels (the heap's put ranks; that PE's rank-table entry is this
    /// rank's own address). Without such a module a PE that is not mapped is an error on every
    /// rank, naming it. The heap holds this `Nvshmem` until it is freed.
    pub(crate) fn new_heap(self: &Arc<Self>, g: &Group, body: u64) -> Result<crate::heap::SymmetricHeap> {
        // The user's bytes and the heap's tables after them.
        let total = crate::heap::SymmetricHeap::total_bytes(body, g.world());
        let bytes = usize::try_from(total).map_err(|_| err(format!("a heap of {total} bytes")))?;
        // PE numbers must be this group's ranks on every rank before the collective malloc (a
        // rank that refused alone would leave the others in it).
        let same = if (g.rank(), g.world()) == (self.group.rank(), self.group.world()) {
            Ok(())
        } else {
            Err(err(format!(
                "NVSHMEM was set up on another group than this one (PE numbers would not be ranks: this rank is PE {} of {}, rank {} of {})",
                self.group.rank(),
                self.group.world(),
                g.rank(),
                g.world()
            )))
        };
        all_ok(g, "checking NVSHMEM's group", same)?;
        // SAFETY: `nvshmem_malloc(size_t) -> void*`, collective; every rank calls it here.
        let p = unsafe { self.sym::<unsafe extern "C" fn(usize) -> *mut c_void>("nvshmem_malloc")?(bytes) } as u64;
        let local = if p == 0 {
            Err(err(format!("nvshmem_malloc({bytes}) failed on rank {} (the symmetric heap is NVSHMEM_SYMMETRIC_SIZE)", g.rank())))
        } else {
            let s = g.stream();
            // SAFETY: `p` is a fresh symmetric allocation of `bytes` bytes that no kernel uses yet.
            unsafe { driver::memset_d8_async(p, 0, bytes, s) }
                .and_then(|_| s.synchronize())
                .map_err(|e| err(format!("zeroing the heap: {e}")))
                .and_then(|_| (0..g.world()).map(|pe| self.direct_ptr(p, pe)).collect::<Result<Vec<_>>>())
                .and_then(|bases| self.put_ranks(g.rank(), p, &bases))
        };
        // Every rank learns whether every rank succeeded (so none waits for a failed one). A
        // refused allocation stays in NVSHMEM's heap until it is finalised.
        let (bases, put) = all_ok(g, "making its part of the NVSHMEM heap", local)?;
        g.adopt_heap(Box::new(NvshmemMemory { nv: self.clone(), ptr: p }), (p, body), bases, put)
    }

    /// The peer table and put ranks of a heap at `own` given each PE's `nvshmem_ptr` (see
    /// [`put_table`]).
    fn put_ranks(&self, rank: usize, own: u64, bases: &[Option<u64>]) -> Result<(Vec<u64>, Vec<usize>)> {
        let forced = std::env::var("MOE_EP_NVSHMEM_PUT").is_ok_and(|v| v == "all");
        put_table(rank, own, bases, forced, || self.ll.is_some())
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
        // No collective here: NVSHMEM stays initialised (see `finalize`). The module stays
        // loaded and bound too: a kernel of it may still be queued.
        if let Some(m) = self.module.take() {
            std::mem::forget(m);
        }
    }
}

/// The peer table and put ranks of rank `rank`'s heap at `own`, from each PE's `nvshmem_ptr`
/// (`bases`): a PE that is not mapped (another node), or with `forced` every other PE, is a put
/// rank (its entry is `own`, the kernels reach it through NVSHMEM calls); the others keep their
/// mapped address. Put ranks need the NVSHMEM module's low-latency kernels (`has_module`).
fn put_table(rank: usize, own: u64, bases: &[Option<u64>], forced: bool, has_module: impl FnOnce() -> bool) -> Result<(Vec<u64>, Vec<usize>)> {
    let far: Vec<usize> = (0..bases.len()).filter(|&pe| bases[pe].is_none() && pe != rank).collect();
    let put: Vec<usize> = (0..bases.len()).filter(|&pe| pe != rank && (forced || bases[pe].is_none())).collect();
    if !put.is_empty() && !has_module() {
        let why = if far.is_empty() { "MOE_EP_NVSHMEM_PUT=all".to_string() } else { format!("PEs {far:?} are not mapped: another node") };
        return Err(err(format!(
            "rank {rank} reaches PEs {put:?} only through NVSHMEM calls ({why}); that needs the NVSHMEM module's low-latency kernels (Nvshmem::init with the image of build-ptx --nvshmem)"
        )));
    }
    let table = (0..bases.len()).map(|pe| if put.contains(&pe) { own } else { bases[pe].unwrap_or(own) }).collect();
    Ok((table, put))
}

/// Collective: every rank's outcome of one step, agreed: this rank's own error, else an error
/// naming the ranks that failed at `what`, else the value.
fn all_ok<T>(g: &Group, what: &'static str, local: Result<T>) -> Result<T> {
    let failed = ranks_where(&agree(g, what, local.is_ok() as u8)?, |c| c == 0);
    let v = local?;
    if failed.is_empty() { Ok(v) } else { Err(err(format!("ranks {failed:?} failed at {what} (see their errors)"))) }
}

/// All-gathers one byte per rank over `g`'s exchange.
fn agree(g: &Group, what: &'static str, mine: u8) -> Result<Vec<u8>> {
    let (ex, timeout) = g.exchange();
    let all = ex.all_gather_as(what, &[mine], timeout)?;
    Ok(all.iter().map(|b| b.first().copied().unwrap_or(0)).collect())
}

/// The ranks whose byte satisfies `f`.
fn ranks_where(all: &[u8], f: impl Fn(u8) -> bool) -> Vec<usize> {
    all.iter().enumerate().filter(|(_, b)| f(**b)).map(|(r, _)| r).collect()
}

/// A moe-ep heap's memory in NVSHMEM's symmetric heap: `nvshmem_free`d (collective) by the
/// heap's `destroy`; dropped otherwise, it stays allocated until NVSHMEM is finalised
/// ([`Nvshmem::finalize`] refuses while a heap still holds `nv`).
struct NvshmemMemory {
    nv: Arc<Nvshmem>,
    ptr: u64,
}

impl crate::heap::ExternalHeap for NvshmemMemory {
    fn kernel(&self, k: Kernel) -> Result<(sys::CUfunction, u32)> {
        self.nv.kernel(k)
    }

    fn free(self: Box<Self>) -> Result<()> {
        // SAFETY: `ptr` came from `nvshmem_malloc` and is freed once, collectively (every rank's
        // `destroy` reaches this after meeting the others; no kernel of any rank uses it).
        let f = unsafe { self.nv.sym::<unsafe extern "C" fn(*mut c_void)>("nvshmem_free")? };
        // SAFETY: as above.
        unsafe { f(self.ptr as *mut c_void) };
        Ok(())
    }
}

/// A symmetric allocation (`nvshmem_malloc`) for probes, freed (`nvshmem_free`, collective) on
/// drop: every rank must drop it at the same point.
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

    /// Copies `v` to the start of this rank's copy, after `stream`'s earlier work (and waits).
    pub fn write<T: bytemuck::Pod>(&self, stream: &CudaStream, v: &[T]) -> Result<()> {
        if std::mem::size_of_val(v) > self.bytes {
            return Err(Error::invalid("v", format!("{} bytes do not fit a symmetric buffer of {}", std::mem::size_of_val(v), self.bytes)));
        }
        // SAFETY: the buffer holds `self.bytes` bytes, checked above.
        unsafe { driver::copy_to_device(v, self.ptr, stream) }.map_err(|e| err(format!("writing a symmetric buffer: {e}")))
    }

    /// This rank's whole copy as `T`s, after `stream`'s earlier work.
    pub fn to_vec<T: bytemuck::Pod + Default>(&self, stream: &CudaStream) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.bytes / std::mem::size_of::<T>()];
        // SAFETY: `v` covers at most `self.bytes` bytes of the buffer, any bit pattern is a `T`.
        unsafe { driver::copy_to_host(self.ptr, &mut v, stream) }.map_err(|e| err(format!("reading a symmetric buffer: {e}")))?;
        Ok(v)
    }

    /// Fills this rank's copy with `word`, stream-ordered.
    pub fn fill_u32(&self, stream: &CudaStream, word: u32) -> Result<()> {
        // SAFETY: `cuMemsetD32Async` over the buffer's whole words, on `stream`.
        unsafe { sys::cuMemsetD32Async(self.ptr, word, self.bytes / 4, stream.cu_stream()) }
            .result()
            .map_err(|e| err(format!("filling a symmetric buffer: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_ranks_are_the_unmapped_pes_or_every_other_one_when_forced() {
        let own = 0x1000;
        let bases = [Some(own), Some(0x2000), None, Some(0x4000), None];
        let (table, put) = put_table(0, own, &bases, false, || true).unwrap();
        assert_eq!(table, vec![own, 0x2000, own, 0x4000, own]);
        assert_eq!(put, vec![2, 4]);
        let (table, put) = put_table(0, own, &bases, true, || true).unwrap();
        assert_eq!(table, vec![own; 5]);
        assert_eq!(put, vec![1, 2, 3, 4], "every PE but this rank's own");
        // All mapped, not forced: no put rank, and no module needed.
        let mapped = [Some(own), Some(0x2000)];
        assert_eq!(put_table(0, own, &mapped, false, || panic!("the module was looked for")).unwrap(), (vec![own, 0x2000], vec![]));
        // A put rank without the module: an error naming the PEs and the reason.
        let e = put_table(3, 0x4000, &bases, false, || false).unwrap_err().to_string();
        assert!(e.contains("rank 3 reaches PEs [2, 4]") && e.contains("another node") && e.contains("build-ptx --nvshmem"), "{e}");
        let e = put_table(1, 0x2000, &mapped, true, || false).unwrap_err().to_string();
        assert!(e.contains("PEs [0]") && e.contains("MOE_EP_NVSHMEM_PUT=all"), "{e}");
        // Past 32 PEs (no mask to outgrow any more): PEs 1..64 unmapped are put ranks.
        let many = vec![None; 64];
        let (table, put) = put_table(0, own, &many, false, || true).unwrap();
        assert_eq!((table, put), (vec![own; 64], (1..64).collect::<Vec<_>>()));
    }

    #[test]
    fn host_versions_accepted_from_the_bitcode_on_within_its_major() {
        for ok in [(3, 4, 5), (3, 4, 6), (3, 8, 0), (3, 10, 0)] {
            assert!(host_version_supported(ok), "{ok:?} refused");
        }
        for refused in [(3, 4, 4), (3, 3, 9), (2, 9, 0), (4, 0, 0), (0, 0, 0)] {
            assert!(!host_version_supported(refused), "{refused:?} accepted");
        }
    }

    /// The attribute block as NVSHMEM 3.4's `nvshmem_types.h` and `nvshmem_uniqueid.h` lay it
    /// out (`nvshmemx_init_attr_v1`, 144 bytes).
    #[test]
    fn init_attr_has_nvshmem_3_4_layout() {
        let word = |at: usize| i32::from_le_bytes(ATTR_INIT[at..at + 4].try_into().unwrap());
        assert_eq!(word(0), (1 << 16) + 144, "attribute version");
        assert_eq!(&ATTR_INIT[8..16], &[0; 8], "mpi_comm");
        assert_eq!(word(16), (1 << 16) + 128, "argument block version");
        assert_eq!(word(24), (1 << 16) + 24, "unique-id arguments version");
        assert_eq!(&ATTR_INIT[32..40], &[0; 8], "unique id pointer");
        assert_eq!((word(40), word(44)), (-1, -1), "rank and size unset");
        assert!(ATTR_INIT[48..].iter().all(|&b| b == 0), "padding");
    }
}
