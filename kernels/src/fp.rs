//! FP8 scale math shared by the low-latency kernel and the CPU reference, and the CPU side
//! of the e4m3 and bf16 conversions (the device uses `cvt` instructions, checked against
//! these by the device-layer GPU test).

use crate::abi::{E4M3_MAX, FP8_AMAX_FLOOR, scale_fmt};

/// The scale of one 128-channel group and its reciprocal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8Scale {
    /// What travels with the token: `x ~= q * scale`.
    pub scale: f32,
    /// What the values are multiplied by before the cast.
    pub inv: f32,
    /// The biased exponent of `scale` for UE8M0 (power-of-two formats only).
    pub ue8m0: u8,
}

/// Scale for a group whose largest magnitude is `amax`, in format `fmt` ([`scale_fmt`]).
/// Plain IEEE f32 division (the PTX check makes sure it compiles to `div.rn.f32`).
#[inline(always)]
pub fn fp8_scale(amax: f32, fmt: u32) -> Fp8Scale {
    let amax = if amax > FP8_AMAX_FLOOR { amax } else { FP8_AMAX_FLOOR };
    if fmt == scale_fmt::F32 {
        return Fp8Scale { scale: amax / E4M3_MAX, inv: E4M3_MAX / amax, ue8m0: 0 };
    }
    let raw = (amax / E4M3_MAX).to_bits();
    let mut e = (raw >> 23) & 0xff;
    if raw & 0x7f_ffff != 0 {
        e += 1;
    }
    Fp8Scale { scale: f32::from_bits(e << 23), inv: f32::from_bits((254 - e) << 23), ue8m0: e as u8 }
}

/// f32 -> FP8 e4m3 (the "fn" variant: no infinities, 0x7f is NaN), round to nearest even,
/// saturating to +-448, as `cvt.rn.satfinite.e4m3x2.f32` does.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = if x < 0.0 { -x } else { x };
    if a > E4M3_MAX {
        return sign | 0x7e;
    }
    // Smallest normal is 2^-6; below it the step is 2^-9.
    const MIN_NORMAL: f32 = 0.015625;
    if a < MIN_NORMAL {
        let q = round_ties_even(a * 512.0) as u8; // exact scaling by 2^9
        return sign | q;
    }
    let bits = a.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    // Mantissa in units of 2^(e-3): a / 2^(e-3), exact.
    let m = a * f32::from_bits(((127 - e + 3) as u32) << 23);
    let mut q = round_ties_even(m) as u32; // 8..=16
    let mut e = e;
    if q == 16 {
        q = 8;
        e += 1;
    }
    let code = (((e + 7) as u32) << 3) | (q - 8);
    if code > 0x7e {
        return sign | 0x7e;
    }
    sign | code as u8
}

/// FP8 e4m3 -> f32 (exact).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    if e == 0xf && b & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 { sign * m * (1.0 / 512.0) } else { sign * (1.0 + m / 8.0) * pow2(e - 7) }
}

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 -> bf16 bits, round to nearest even (NaN becomes the canonical 0x7fff), as
/// `cvt.rn.bf16.f32` does.
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fff;
    }
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7fff + lsb) >> 16) as u16
}

fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Round half to even for non-negative values below 2^23 (`no_std` has no `round_ties_even`
/// on stable core for f32 in every toolchain).
fn round_ties_even(v: f32) -> f32 {
    let f = v as u32 as f32; // floor for non-negative
    let d = v - f;
    if d > 0.5 || (d == 0.5 && (f as u32) & 1 == 1) { f + 1.0 } else { f }
}
