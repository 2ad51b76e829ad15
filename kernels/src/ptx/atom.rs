//! Atomics on global and shared memory.

use core::arch::asm;

macro_rules! atom_global {
    ($(#[$doc:meta])* $name:ident, $op:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// `p` must be a valid, aligned address of global memory (local or peer-mapped).
        #[inline(always)]
        pub unsafe fn $name(p: *mut u32, v: u32) -> u32 {
            let old: u32;
            // SAFETY: the caller guarantees `p` is valid global memory.
            unsafe {
                asm!(concat!("{{ .reg .b64 g; cvta.to.global.u64 g, {1}; ", $op, " {0}, [g], {2}; }}"),
                    out(reg32) old, in(reg64) p, in(reg32) v, options(nostack))
            };
            old
        }
    };
}

atom_global!(
    /// `atom.relaxed.sys.global.add.u32` (PTX 6.0, sm_70): fetch-and-add visible to every GPU,
    /// no ordering. Use to reserve slots in a peer's buffer.
    atom_relaxed_sys_global_add_u32, "atom.relaxed.sys.global.add.u32");
atom_global!(
    /// `atom.relaxed.gpu.global.add.u32` (PTX 6.0, sm_70): fetch-and-add among blocks of this
    /// GPU, no ordering. Use to take slots in this GPU's own buffers.
    atom_relaxed_gpu_global_add_u32, "atom.relaxed.gpu.global.add.u32");
atom_global!(
    /// `atom.acq_rel.gpu.global.add.u32` (PTX 6.0, sm_70): fetch-and-add among blocks of this
    /// GPU that also orders: the last block to arrive sees everything the others did.
    atom_acq_rel_gpu_global_add_u32, "atom.acq_rel.gpu.global.add.u32");

/// `atom.relaxed.sys.global.cas.b32` (PTX 6.0, sm_70): compare-and-swap visible to every GPU
/// and the host, no ordering. Use to claim a one-shot record.
///
/// # Safety
/// `p` must be a valid, aligned address of global or host-mapped memory.
#[inline(always)]
pub unsafe fn atom_relaxed_sys_global_cas_b32(p: *mut u32, cmp: u32, new: u32) -> u32 {
    let old: u32;
    // SAFETY: the caller guarantees `p` is valid memory.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {1}; atom.relaxed.sys.global.cas.b32 {0}, [g], {2}, {3}; }}",
            out(reg32) old, in(reg64) p, in(reg32) cmp, in(reg32) new, options(nostack))
    };
    old
}

/// `red.release.sys.global.add.u32` (PTX 6.0, sm_70): add without a result, releasing this
/// thread's earlier writes to every GPU. Use for "my rows have landed" arrival counters.
///
/// # Safety
/// `p` must be a valid, aligned address of global memory (local or peer-mapped).
#[inline(always)]
pub unsafe fn red_release_sys_global_add_u32(p: *mut u32, v: u32) {
    // SAFETY: the caller guarantees `p` is valid global memory.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {0}; red.release.sys.global.add.u32 [g], {1}; }}",
            in(reg64) p, in(reg32) v, options(nostack))
    };
}

/// `red.relaxed.sys.global.add.u32` (PTX 6.0, sm_70): add without a result, visible to every
/// GPU, no ordering. After one `fence.acq_rel.sys` it publishes like a release (the fence
/// orders everything before it), so several counters cost one fence instead of one each.
///
/// # Safety
/// `p` must be a valid, aligned address of global memory (local or peer-mapped).
#[inline(always)]
pub unsafe fn red_relaxed_sys_global_add_u32(p: *mut u32, v: u32) {
    // SAFETY: the caller guarantees `p` is valid global memory.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {0}; red.relaxed.sys.global.add.u32 [g], {1}; }}",
            in(reg64) p, in(reg32) v, options(nostack))
    };
}

/// `red.relaxed.gpu.global.add.s32` (PTX 6.0, sm_70): add without a result on this GPU, no
/// ordering. Use for statistics.
///
/// # Safety
/// `p` must be a valid, aligned address of global memory.
#[inline(always)]
pub unsafe fn red_relaxed_gpu_global_add_s32(p: *mut i32, v: i32) {
    // SAFETY: the caller guarantees `p` is valid global memory.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {0}; red.relaxed.gpu.global.add.s32 [g], {1}; }}",
            in(reg64) p, in(reg32) v, options(nostack))
    };
}

/// `atom.shared::cta.add.u32` (PTX 7.8, sm_70): fetch-and-add on shared memory (address from
/// [`super::dyn_smem_base`]).
///
/// # Safety
/// `a` must be a valid, aligned shared-memory address of this block.
#[inline(always)]
pub unsafe fn atom_shared_cta_add_u32(a: u32, v: u32) -> u32 {
    let old: u32;
    // SAFETY: the caller guarantees `a` is valid shared memory.
    unsafe { asm!("atom.shared::cta.add.u32 {0}, [{1}], {2};", out(reg32) old, in(reg32) a, in(reg32) v, options(nostack)) };
    old
}
