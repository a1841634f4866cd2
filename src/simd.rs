//! Vector helpers shared by the project's own x86 kernels.
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
