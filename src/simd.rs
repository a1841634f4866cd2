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

/// `out[i] = bits[i]` as IEEE half values widened to single precision (exact), eight at a time with
/// F16C where the CPU has it.
pub(crate) fn widen_f16(bits: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX.
        unsafe { widen_f16_f16c(bits, out) };
        return;
    }
    out.iter_mut().zip(bits).for_each(|(v, &b)| *v = f16_to_f32(b));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16_f16c(bits: &[u16], out: &mut [f32]) {
    let n = bits.len().min(out.len());
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        let halves = _mm_loadu_si128(bits.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(halves));
    }
    for i in whole..n {
        out[i] = f16_to_f32(bits[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_eight_at_a_time_equals_one_at_a_time() {
        // Every bit pattern but NaNs (whose payloads need not survive), in a length that leaves a tail.
        let bits: Vec<u16> = (0..=u16::MAX).filter(|b| (b & 0x7c00) != 0x7c00 || (b & 0x3ff) == 0).collect();
        let bits = &bits[..bits.len() - 3];
        let mut out = vec![0f32; bits.len()];
        widen_f16(bits, &mut out);
        for (b, v) in bits.iter().zip(&out) {
            assert_eq!(v.to_bits(), f16_to_f32(*b).to_bits(), "{b:#x}");
        }
    }
}
