//! Helpers shared by the project's own kernels.
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The 8 lanes of `x` added in one fixed order: lane `l` with lane `l + 4`, then those four pairwise
/// (0 with 2, 1 with 3), then the two; kernels that promise the same bits for the same inputs sum with it.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn lanes_sum(x: __m256) -> f32 {
    let quads = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    let pairs = _mm_add_ps(quads, _mm_movehl_ps(quads, quads));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
}

/// IEEE half to single precision, exactly (every half value is a float value).
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => {
            let subnormal = mantissa as f32 * 2f32.powi(-24);
            return if sign != 0 { -subnormal } else { subnormal };
        }
        0x1f => 0xff << 23 | mantissa << 13,
        _ => (exponent + 112) << 23 | mantissa << 13,
    };
    f32::from_bits(sign | magnitude)
}
