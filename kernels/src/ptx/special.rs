//! Special registers: thread and block indices, sizes, timers.

use core::arch::asm;

macro_rules! sreg_u32 {
    ($(#[$doc:meta])* $name:ident, $reg:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name() -> u32 {
            let r: u32;
            // SAFETY: reads a special register; no memory access.
            unsafe { asm!(concat!("mov.u32 {0}, ", $reg, ";"), out(reg32) r, options(pure, nomem, nostack)) };
            r
        }
    };
}

sreg_u32!(
    /// `mov.u32 %r, %tid.x;` (PTX 1.0, all sm): thread index within the block.
    tid_x, "%tid.x");
sreg_u32!(
    /// `mov.u32 %r, %ntid.x;` (PTX 1.0, all sm): threads per block.
    ntid_x, "%ntid.x");
sreg_u32!(
    /// `mov.u32 %r, %ctaid.x;` (PTX 1.0, all sm): block index within the grid.
    ctaid_x, "%ctaid.x");
sreg_u32!(
    /// `mov.u32 %r, %nctaid.x;` (PTX 1.0, all sm): blocks in the grid.
    nctaid_x, "%nctaid.x");
sreg_u32!(
    /// `mov.u32 %r, %laneid;` (PTX 1.3, all sm): lane within the warp.
    laneid, "%laneid");
sreg_u32!(
    /// `mov.u32 %r, %smid;` (PTX 1.3, all sm): the SM running this thread (diagnostics only;
    /// it can change under preemption).
    smid, "%smid");
sreg_u32!(
    /// `mov.u32 %r, %dynamic_smem_size;` (PTX 4.1, sm_20): dynamic shared bytes of this launch.
    dynamic_smem_size, "%dynamic_smem_size");

/// `mov.u64 %r, %globaltimer;` (PTX 3.1, sm_30): nanoseconds of a GPU-wide timer. Use for
/// spin-wait deadlines; it ticks in steps of up to a microsecond.
#[inline(always)]
pub fn globaltimer() -> u64 {
    let r: u64;
    // SAFETY: reads a special register; not `pure`, every read must happen.
    unsafe { asm!("mov.u64 {0}, %globaltimer;", out(reg64) r, options(nomem, nostack)) };
    r
}

/// `nanosleep.u32 t;` (PTX 6.3, sm_70): suspends the thread for about `t` ns (at most 1 ms).
/// Use in slow polling loops to leave issue slots to others.
#[inline(always)]
pub fn nanosleep_u32(t: u32) {
    // SAFETY: only delays the thread.
    unsafe { asm!("nanosleep.u32 {0};", in(reg32) t, options(nomem, nostack)) };
}
