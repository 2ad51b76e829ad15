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
    let nv = Arc::new(Nvshmem::init(g, None)?);
    *slot = Some(nv.clone());
    Ok(nv)
}

/// `(major, minor, patch, init status)` of the process's NVSHMEM once set up, else `None`.
pub(crate) fn status() -> Option<(i32, i32, i32, i32)> {
    lock(&NVSHMEM).as_ref().map(|nv| {
        let (a, b, c) = nv.version();
        (a, b, c, nv.init_status())
    })
}
