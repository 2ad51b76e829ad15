//! Conversions and IEEE-rounded f32 arithmetic.
//!
//! The kernels use these (not Rust's `+`/`*`) wherever a result must equal the CPU reference
//! bit for bit: each wrapper names its rounding, and none may be contracted into an `fma`
//! by ptxas.

use core::arch::asm;

/// `cvt.rn.satfinite.e4m3x2.f32 d, hi, lo;` (PTX 7.8, sm_89): two f32 to FP8 e4m3, round to
/// nearest even, saturating to +-448 (NaN stays NaN). `lo` lands in the low byte.
#[inline(always)]
pub fn cvt_rn_satfinite_e4m3x2_f32(hi: f32, lo: f32) -> u16 {
    let d: u16;
    // SAFETY: register conversion.
    unsafe { asm!("cvt.rn.satfinite.e4m3x2.f32 {0}, {1}, {2};", out(reg16) d, in(reg32) hi, in(reg32) lo, options(pure, nomem, nostack)) };
    d
}

/// `cvt.rn.bf16x2.f32 d, hi, lo;` (PTX 7.0, sm_80): two f32 to bf16, round to nearest even;
/// `lo` lands in the low half.
#[inline(always)]
pub fn cvt_rn_bf16x2_f32(hi: f32, lo: f32) -> u32 {
    let d: u32;
    // SAFETY: register conversion.
    unsafe { asm!("cvt.rn.bf16x2.f32 {0}, {1}, {2};", out(reg32) d, in(reg32) hi, in(reg32) lo, options(pure, nomem, nostack)) };
    d
}

/// `cvt.f32.bf16 d, a;` (PTX 7.8, sm_90): bf16 (in the low 16 bits) to f32, exact.
#[inline(always)]
pub fn cvt_f32_bf16(a: u16) -> f32 {
    let d: f32;
    // SAFETY: register conversion.
    unsafe { asm!("cvt.f32.bf16 {0}, {1};", out(reg32) d, in(reg16) a, options(pure, nomem, nostack)) };
    d
}

macro_rules! f32_binop {
    ($(#[$doc:meta])* $name:ident, $op:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name(a: f32, b: f32) -> f32 {
            let d: f32;
            // SAFETY: register arithmetic.
            unsafe { asm!(concat!($op, " {0}, {1}, {2};"), out(reg32) d, in(reg32) a, in(reg32) b, options(pure, nomem, nostack)) };
            d
        }
    };
}

f32_binop!(
    /// `add.rn.f32` (PTX 1.0, all sm): IEEE add, never fused into an fma.
    add_rn_f32, "add.rn.f32");
f32_binop!(
    /// `mul.rn.f32` (PTX 1.0, all sm): IEEE multiply, never fused into an fma.
    mul_rn_f32, "mul.rn.f32");
f32_binop!(
    /// `div.rn.f32` (PTX 1.4, sm_20): IEEE division (not the fast approximation).
    div_rn_f32, "div.rn.f32");
f32_binop!(
    /// `max.f32` (PTX 1.0, all sm): maximum (a NaN operand yields the other operand).
    max_f32, "max.f32");

/// `fma.rn.f32 d, a, b, c;` (PTX 2.0, sm_20): `a * b + c` with one rounding.
#[inline(always)]
pub fn fma_rn_f32(a: f32, b: f32, c: f32) -> f32 {
    let d: f32;
    // SAFETY: register arithmetic.
    unsafe { asm!("fma.rn.f32 {0}, {1}, {2}, {3};", out(reg32) d, in(reg32) a, in(reg32) b, in(reg32) c, options(pure, nomem, nostack)) };
    d
}

/// `abs.f32 d, a;` (PTX 1.0, all sm): absolute value (clears the sign bit).
#[inline(always)]
pub fn abs_f32(a: f32) -> f32 {
    let d: f32;
    // SAFETY: register arithmetic.
    unsafe { asm!("abs.f32 {0}, {1};", out(reg32) d, in(reg32) a, options(pure, nomem, nostack)) };
    d
}
