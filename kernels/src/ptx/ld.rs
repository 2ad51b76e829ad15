//! Loads from global memory.
//!
//! Scalar loads come in the orderings the memory model names: `acquire` (pairs with a
//! `release` store or fence of the writer, at the same scope), `relaxed` (atomic, no order),
//! `volatile` (every load reaches memory; no order). Vector loads are weak: use them for
//! payload that an acquire (or a kernel boundary) has already made visible.

use core::arch::asm;

macro_rules! ld_scalar {
    ($(#[$doc:meta])* $name:ident, $op:literal, $t:ty, $cls:ident) => {
        $(#[$doc])*
        #[allow(non_snake_case)] // the name spells the PTX qualifier `L1::no_allocate`
        ///
        /// # Safety
        /// `p` must be a valid, aligned address of global memory (local or peer-mapped).
        #[inline(always)]
        pub unsafe fn $name(p: *const $t) -> $t {
            let v: $t;
            // SAFETY: the caller guarantees `p` is valid global memory.
            unsafe {
                asm!(concat!("{{ .reg .b64 g; cvta.to.global.u64 g, {1}; ", $op, " {0}, [g]; }}"),
                    out($cls) v, in(reg64) p, options(nostack))
            };
            v
        }
    };
}

ld_scalar!(
    /// `ld.acquire.sys.global.u32` (PTX 6.0, sm_70): read a flag another GPU or the host
    /// publishes with a `.sys` release; later reads see what was written before it.
    ld_acquire_sys_global_u32, "ld.acquire.sys.global.u32", u32, reg32);
ld_scalar!(
    /// `ld.acquire.sys.global.u64` (PTX 6.0, sm_70): 64-bit form of [`ld_acquire_sys_global_u32`].
    ld_acquire_sys_global_u64, "ld.acquire.sys.global.u64", u64, reg64);
ld_scalar!(
    /// `ld.acquire.gpu.global.u32` (PTX 6.0, sm_70): read a flag another block of this GPU
    /// publishes with a `.gpu` release. Not enough for flags written over NVLink.
    ld_acquire_gpu_global_u32, "ld.acquire.gpu.global.u32", u32, reg32);
ld_scalar!(
    /// `ld.relaxed.sys.global.u32` (PTX 6.0, sm_70): atomic read with no ordering, e.g. polling
    /// an abort word or a counter whose order an acquire already established.
    ld_relaxed_sys_global_u32, "ld.relaxed.sys.global.u32", u32, reg32);
ld_scalar!(
    /// `ld.relaxed.sys.global.s32` (PTX 6.0, sm_70): signed form of [`ld_relaxed_sys_global_u32`].
    ld_relaxed_sys_global_s32, "ld.relaxed.sys.global.s32", i32, reg32);
ld_scalar!(
    /// `ld.global.u32` (PTX 1.0, all sm): weak 4-byte load. Use for metadata written during the
    /// kernel by peers, after an acquire made it visible.
    ld_global_u32, "ld.global.u32", u32, reg32);
ld_scalar!(
    /// `ld.volatile.global.u32` (PTX 1.1, all sm): every load reaches memory, no ordering.
    /// Prefer `ld.relaxed` on sm_70+; kept for host-written words polled by old-style loops.
    ld_volatile_global_u32, "ld.volatile.global.u32", u32, reg32);
ld_scalar!(
    /// `ld.global.nc.s32` (PTX 2.0, sm_35): read-only cached load. Only for memory nobody
    /// writes while the kernel runs (kernel inputs).
    ld_global_nc_s32, "ld.global.nc.s32", i32, reg32);
ld_scalar!(
    /// `ld.global.nc.s64` (PTX 2.0, sm_35): 64-bit form of [`ld_global_nc_s32`].
    ld_global_nc_s64, "ld.global.nc.s64", i64, reg64);
ld_scalar!(
    /// `ld.global.nc.f32` (PTX 2.0, sm_35): f32 form of [`ld_global_nc_s32`].
    ld_global_nc_f32, "ld.global.nc.f32", f32, reg32);
ld_scalar!(
    /// `ld.global.nc.u16` (PTX 2.0, sm_35): 16-bit form of [`ld_global_nc_s32`].
    ld_global_nc_u16, "ld.global.nc.u16", u16, reg16);

/// `ld.global.nc.u8` (PTX 2.0, sm_35): byte form of [`ld_global_nc_s32`].
///
/// # Safety
/// `p` must be a valid address of global memory.
#[inline(always)]
pub unsafe fn ld_global_nc_u8(p: *const u8) -> u8 {
    let v: u16;
    // SAFETY: the caller guarantees `p` is valid global memory.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {1}; ld.global.nc.u8 {0}, [g]; }}",
            out(reg16) v, in(reg64) p, options(nostack))
    };
    v as u8
}

macro_rules! ld_v4 {
    ($(#[$doc:meta])* $name:ident, $op:literal) => {
        $(#[$doc])*
        #[allow(non_snake_case)] // the name spells the PTX qualifier `L1::no_allocate`
        ///
        /// # Safety
        /// `p` must be a valid, 16-byte aligned address of global memory.
        #[inline(always)]
        pub unsafe fn $name(p: *const [u32; 4]) -> [u32; 4] {
            let (a, b, c, d): (u32, u32, u32, u32);
            // SAFETY: the caller guarantees `p` is valid, aligned global memory.
            unsafe {
                asm!(concat!("{{ .reg .b64 g; cvta.to.global.u64 g, {4}; ", $op, " {{{0}, {1}, {2}, {3}}}, [g]; }}"),
                    out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg64) p, options(nostack))
            };
            [a, b, c, d]
        }
    };
}

ld_v4!(
    /// `ld.global.v4.u32` (PTX 1.0, all sm): weak 16-byte load. Use for payload written
    /// during the kernel by peers, after an acquire made it visible.
    ld_global_v4_u32, "ld.global.v4.u32");
ld_v4!(
    /// `ld.global.nc.v4.u32` (PTX 2.0, sm_35): read-only 16-byte load through the texture
    /// path. Only for memory nobody writes while the kernel runs.
    ld_global_nc_v4_u32, "ld.global.nc.v4.u32");
ld_v4!(
    /// `ld.global.nc.L1::no_allocate.v4.u32` (PTX 7.4, sm_70): read-only 16-byte load that
    /// does not allocate in L1. Use for streaming kernel inputs read once.
    ld_global_nc_L1_no_allocate_v4_u32, "ld.global.nc.L1::no_allocate.v4.u32");
