//! Stores to global memory.
//!
//! `release` stores publish: every write the thread (or, through a barrier, its block) made
//! before becomes visible at the scope to whoever acquires the value. Vector stores are weak:
//! the payload half of "payload first, flag last".

use core::arch::asm;

macro_rules! st_scalar {
    ($(#[$doc:meta])* $name:ident, $op:literal, $t:ty, $cls:ident) => {
        $(#[$doc])*
        #[allow(non_snake_case)] // the name spells the PTX qualifier `L1::no_allocate`
        ///
        /// # Safety
        /// `p` must be a valid, aligned address of global memory (local or peer-mapped).
        #[inline(always)]
        pub unsafe fn $name(p: *mut $t, v: $t) {
            // SAFETY: the caller guarantees `p` is valid global memory.
            unsafe {
                asm!(concat!("{{ .reg .b64 g; cvta.to.global.u64 g, {0}; ", $op, " [g], {1}; }}"),
                    in(reg64) p, in($cls) v, options(nostack))
            };
        }
    };
}

st_scalar!(
    /// `st.release.sys.global.u32` (PTX 6.0, sm_70): publish a flag to other GPUs or the host
    /// after the payload; pairs with `ld.acquire.sys`.
    st_release_sys_global_u32, "st.release.sys.global.u32", u32, reg32);
st_scalar!(
    /// `st.release.gpu.global.u32` (PTX 6.0, sm_70): publish a flag to other blocks of this GPU.
    st_release_gpu_global_u32, "st.release.gpu.global.u32", u32, reg32);
st_scalar!(
    /// `st.relaxed.sys.global.u32` (PTX 6.0, sm_70): atomic store with no ordering, e.g.
    /// resetting a counter whose next writers are ordered by a later release.
    st_relaxed_sys_global_u32, "st.relaxed.sys.global.u32", u32, reg32);
st_scalar!(
    /// `st.relaxed.sys.global.u64` (PTX 6.0, sm_70): 64-bit form of [`st_relaxed_sys_global_u32`].
    st_relaxed_sys_global_u64, "st.relaxed.sys.global.u64", u64, reg64);
st_scalar!(
    /// `st.volatile.global.u32` (PTX 1.1, all sm): the store reaches memory, no ordering.
    st_volatile_global_u32, "st.volatile.global.u32", u32, reg32);
st_scalar!(
    /// `st.global.u32` (PTX 1.0, all sm): weak 4-byte store (metadata beside a payload).
    st_global_u32, "st.global.u32", u32, reg32);
st_scalar!(
    /// `st.global.u64` (PTX 1.0, all sm): weak 8-byte store.
    st_global_u64, "st.global.u64", u64, reg64);

/// `st.global.u8` (PTX 1.0, all sm): weak byte store.
///
/// # Safety
/// `p` must be a valid address of global memory.
#[inline(always)]
pub unsafe fn st_global_u8(p: *mut u8, v: u8) {
    // SAFETY: the caller guarantees `p` is valid global memory.
    unsafe {
        asm!("{{ .reg .b64 g; cvta.to.global.u64 g, {0}; st.global.u8 [g], {1}; }}",
            in(reg64) p, in(reg16) v as u16, options(nostack))
    };
}

macro_rules! st_vec {
    ($(#[$doc:meta])* $name:ident, $op:literal, $n:literal, { $($i:literal),* }, $ptr:literal, $body:literal) => {
        $(#[$doc])*
        #[allow(non_snake_case)] // the name spells the PTX qualifier `L1::no_allocate`
        ///
        /// # Safety
        /// `p` must be a valid global address aligned to the vector size.
        #[inline(always)]
        pub unsafe fn $name(p: *mut [u32; $n], v: [u32; $n]) {
            // SAFETY: the caller guarantees `p` is valid, aligned global memory.
            unsafe {
                asm!(concat!("{{ .reg .b64 g; cvta.to.global.u64 g, {", $ptr, "}; ", $op, " [g], ", $body, "; }}"),
                    $(in(reg32) v[$i],)* in(reg64) p, options(nostack))
            };
        }
    };
}

st_vec!(
    /// `st.global.v4.u32` (PTX 1.0, all sm): weak 16-byte store.
    st_global_v4_u32, "st.global.v4.u32", 4, {0, 1, 2, 3}, "4", "{{{0}, {1}, {2}, {3}}}");
st_vec!(
    /// `st.global.L1::no_allocate.v4.u32` (PTX 7.4, sm_70): weak 16-byte store that does not
    /// allocate in L1. Use for payload streamed to peers.
    st_global_L1_no_allocate_v4_u32, "st.global.L1::no_allocate.v4.u32", 4, {0, 1, 2, 3}, "4", "{{{0}, {1}, {2}, {3}}}");
st_vec!(
    /// `st.global.v2.u32` (PTX 1.0, all sm): weak 8-byte store.
    st_global_v2_u32, "st.global.v2.u32", 2, {0, 1}, "2", "{{{0}, {1}}}");
