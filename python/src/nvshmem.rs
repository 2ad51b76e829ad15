//! NVSHMEM for the Python package: one per process (NVSHMEM itself is per process), set up on
//! the group of the first low-latency buffer that asks for it, or reused where the process has
//! initialised NVSHMEM already, and kept until the process ends: finalising is collective, so it
//! never runs from a garbage collector.

use crate::live::lock;
use moe_ep::Group;
use moe_ep::nvshmem::Nvshmem;
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

/// The NVSHMEM module named by `MOE_EP_NVSHMEM_MODULE` (the sm_90 cubin or PTX of `cargo xtask
/// build-ptx --nvshmem`), whose low-latency kernels reach PEs through NVSHMEM calls (another
/// node, or every PE with `MOE_EP_NVSHMEM_PUT=all`). Without it, buffers reach every PE by
/// direct stores and a PE NVSHMEM does not map is an error. A file that cannot be read is said
/// and left out here, so that every rank still takes the same collective steps (the heap's
/// agreement then fails on every rank if this one needs it).
fn module_image(rank: usize) -> Option<Vec<u8>> {
    let path = std::env::var_os("MOE_EP_NVSHMEM_MODULE")?;
    std::fs::read(&path)
        .inspect_err(|e| eprintln!("moe_ep: rank {rank}: MOE_EP_NVSHMEM_MODULE={}: {e}; NVSHMEM's module is not bound", path.to_string_lossy()))
        .ok()
}

/// `(major, minor, patch, init status)` of the process's NVSHMEM once set up, else `None`.
pub(crate) fn status() -> Option<(i32, i32, i32, i32)> {
    lock(&NVSHMEM).as_ref().map(|nv| {
        let (a, b, c) = nv.version();
        (a, b, c, nv.init_status())
    })
}
