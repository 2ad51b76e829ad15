//! NVSHMEM for the Python package: one per process (NVSHMEM itself is per process), set up on
//! the group of the first low-latency buffer that asks for it, or reused where the process has
//! initialised NVSHMEM already, and kept until the process ends: finalising is collective, so it
//! never runs from a garbage collector.

use crate::live::lock;
use moe_ep::Group;
use moe_ep::nvshmem::Nvshmem;
use pyo3::prelude::*;
use std::sync::{Arc, Mutex};

static NVSHMEM: Mutex<Option<Arc<Nvshmem>>> = Mutex::new(None);

/// The process's NVSHMEM, set up on `g` (collective) the first time.
pub(crate) fn for_group(g: &Group) -> moe_ep::Result<Arc<Nvshmem>> {
    let mut slot = lock(&NVSHMEM);
    if let Some(nv) = slot.as_ref() {
        return Ok(nv.clone());
    }
    let nv = Arc::new(Nvshmem::init(g, module_image(g.rank()).as_deref())?);
    *slot = Some(nv.clone());
    Ok(nv)
}

/// The NVSHMEM module (the sm_90 cubin or PTX of `cargo xtask build-ptx --nvshmem`), whose
/// low-latency kernels reach PEs through NVSHMEM calls (another node, or every PE with
/// `MOE_EP_NVSHMEM_PUT=all`): the file `MOE_EP_NVSHMEM_MODULE` names, else the cubin the release
/// wheel carries beside the package (`MOE_EP_NVSHMEM_MODULE=none`: no module). Without one,
/// buffers reach every PE by direct stores and a PE NVSHMEM does not map is an error. A file that
/// cannot be read is said and left out here, so that every rank still takes the same collective
/// steps (the heap's agreement then fails on every rank if this one needs it).
fn module_image(rank: usize) -> Option<Vec<u8>> {
    let path = match std::env::var_os("MOE_EP_NVSHMEM_MODULE") {
        Some(p) if p == "none" => return None,
        Some(p) => std::path::PathBuf::from(p),
        None => packaged_module()?,
    };
    std::fs::read(&path).inspect_err(|e| eprintln!("moe_ep: rank {rank}: NVSHMEM module {}: {e}; NVSHMEM's module is not bound", path.display())).ok()
}

/// The NVSHMEM module beside the installed package (`moe_ep/moe_ep_nvshmem.cubin`), if the
/// wheel carries one.
fn packaged_module() -> Option<std::path::PathBuf> {
    let dir = Python::with_gil(|py| {
        let file: String = py.import("moe_ep").ok()?.getattr("__file__").ok()?.extract().ok()?;
        Some(std::path::PathBuf::from(file).parent()?.to_path_buf())
    })?;
    Some(dir.join("moe_ep_nvshmem.cubin")).filter(|p| p.is_file())
}

/// Where the NVSHMEM module comes from in this process, for `nvshmem_status`'s callers and the
/// tests: the path bound or to be bound, or why none.
#[pyfunction]
pub(crate) fn nvshmem_module() -> String {
    match std::env::var_os("MOE_EP_NVSHMEM_MODULE") {
        Some(p) if p == "none" => "none (MOE_EP_NVSHMEM_MODULE=none)".into(),
        Some(p) => format!("{} (MOE_EP_NVSHMEM_MODULE)", p.to_string_lossy()),
        None => match packaged_module() {
            Some(p) => format!("{} (carried by the wheel)", p.display()),
            None => "none (the wheel carries no NVSHMEM module and MOE_EP_NVSHMEM_MODULE is unset)".into(),
        },
    }
}

/// `(major, minor, patch, init status)` of the process's NVSHMEM once set up, else `None`.
pub(crate) fn status() -> Option<(i32, i32, i32, i32)> {
    lock(&NVSHMEM).as_ref().map(|nv| {
        let (a, b, c) = nv.version();
        (a, b, c, nv.init_status())
    })
}
