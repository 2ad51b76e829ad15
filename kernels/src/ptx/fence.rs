//! Fences.

use core::arch::asm;

macro_rules! fence {
    ($(#[$doc:meta])* $name:ident, $op:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name() {
            // SAFETY: a fence only orders this thread's memory accesses.
            unsafe { asm!($op, options(nostack)) };
        }
    };
}

fence!(
    /// `fence.acq_rel.sys;` (PTX 6.0, sm_70): orders this thread's (and, after a barrier, its
    /// block's) earlier accesses before its later ones for every GPU and the host. Use before a
    /// relaxed or `red` signal that publishes payload written over NVLink.
    fence_acq_rel_sys, "fence.acq_rel.sys;");
fence!(
    /// `fence.acq_rel.gpu;` (PTX 6.0, sm_70): the same for observers on this GPU only.
    fence_acq_rel_gpu, "fence.acq_rel.gpu;");
fence!(
    /// `fence.sc.sys;` (PTX 6.0, sm_70): sequentially consistent fence; rarely needed.
    fence_sc_sys, "fence.sc.sys;");
fence!(
    /// `fence.proxy.async.shared::cta;` (PTX 8.0, sm_90): makes this thread's generic-proxy
    /// writes to shared memory visible to the async proxy (a following `cp.async.bulk` read).
    fence_proxy_async_shared_cta, "fence.proxy.async.shared::cta;");
fence!(
    /// `fence.proxy.async.global;` (PTX 8.0, sm_90): orders async-proxy (bulk copy) accesses
    /// to global memory with this thread's generic-proxy accesses. Use between a completed
    /// `cp.async.bulk` store and the flag that publishes it.
    fence_proxy_async_global, "fence.proxy.async.global;");
