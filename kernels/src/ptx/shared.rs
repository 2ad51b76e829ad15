//! Shared memory: the dynamic shared window and 32-bit shared-state-space accesses.
//!
//! Rust has no shared-address-space statics on nvptx, so the module declares one extern
//! dynamic shared array and kernels carve it up by offset. Addresses here are 32-bit
//! `.shared` addresses, not generic pointers.

use core::arch::{asm, global_asm};

global_asm!(".extern .shared .align 128 .b8 moe_ep_dyn_smem[];");

/// `mov.u32 %r, moe_ep_dyn_smem;` (PTX 1.0, all sm): `.shared` address of this launch's
/// dynamic shared memory (size fixed by the launch).
#[inline(always)]
pub fn dyn_smem_base() -> u32 {
    let r: u32;
    // SAFETY: takes the address of a symbol; no memory access.
    unsafe { asm!("mov.u32 {0}, moe_ep_dyn_smem;", out(reg32) r, options(pure, nomem, nostack)) };
    r
}

/// `ld.shared::cta.u32` (PTX 7.8, all sm): 4-byte shared load.
///
/// # Safety
/// `a` must be a valid, aligned shared address of this block.
#[inline(always)]
pub unsafe fn ld_shared_cta_u32(a: u32) -> u32 {
    let v: u32;
    // SAFETY: the caller guarantees `a` is valid shared memory.
    unsafe { asm!("ld.shared::cta.u32 {0}, [{1}];", out(reg32) v, in(reg32) a, options(nostack)) };
    v
}

/// `st.shared::cta.u32` (PTX 7.8, all sm): 4-byte shared store.
///
/// # Safety
/// `a` must be a valid, aligned shared address of this block.
#[inline(always)]
pub unsafe fn st_shared_cta_u32(a: u32, v: u32) {
    // SAFETY: the caller guarantees `a` is valid shared memory.
    unsafe { asm!("st.shared::cta.u32 [{0}], {1};", in(reg32) a, in(reg32) v, options(nostack)) };
}

/// `st.shared::cta.v2.u32` (PTX 7.8, all sm): 8-byte shared store.
///
/// # Safety
/// `a` must be a valid, 8-byte aligned shared address of this block.
#[inline(always)]
pub unsafe fn st_shared_cta_v2_u32(a: u32, v: [u32; 2]) {
    // SAFETY: the caller guarantees `a` is valid shared memory.
    unsafe { asm!("st.shared::cta.v2.u32 [{0}], {{{1}, {2}}};", in(reg32) a, in(reg32) v[0], in(reg32) v[1], options(nostack)) };
}

/// `st.shared::cta.v4.u32` (PTX 7.8, all sm): 16-byte shared store.
///
/// # Safety
/// `a` must be a valid, 16-byte aligned shared address of this block.
#[inline(always)]
pub unsafe fn st_shared_cta_v4_u32(a: u32, v: [u32; 4]) {
    // SAFETY: the caller guarantees `a` is valid shared memory.
    unsafe {
        asm!("st.shared::cta.v4.u32 [{0}], {{{1}, {2}, {3}, {4}}};",
            in(reg32) a, in(reg32) v[0], in(reg32) v[1], in(reg32) v[2], in(reg32) v[3], options(nostack))
    };
}

/// `ld.shared::cta.v4.u32` (PTX 7.8, all sm): 16-byte shared load.
///
/// # Safety
/// `a` must be a valid, 16-byte aligned shared address of this block.
#[inline(always)]
pub unsafe fn ld_shared_cta_v4_u32(a: u32) -> [u32; 4] {
    let (x, y, z, w): (u32, u32, u32, u32);
    // SAFETY: the caller guarantees `a` is valid shared memory.
    unsafe {
        asm!("ld.shared::cta.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
            out(reg32) x, out(reg32) y, out(reg32) z, out(reg32) w, in(reg32) a, options(nostack))
    };
    [x, y, z, w]
}
