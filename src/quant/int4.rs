//! 4-bit weights (`--load-4bit`): codes 0..=15 in groups of input columns, each group with a scale and a
//! low end, `w = code * scale + low`. Decoding steps (a few input rows) read the packed codes directly on
//! the CPU, so each token reads half a byte per weight; longer inputs (prefill) and other devices expand
//! the matrix to the compute dtype and run the ordinary GEMM, where the expansion is a small share.
use crate::error::{Error, Result};
use crate::layers::Linear;
use tch::{Device, Kind, Tensor};

/// Input columns per group where the width allows it (as common 4-bit schemes use).
pub const INT4_GROUP: i64 = 64;

/// Inputs with at most this many rows take the packed-code path on the CPU.
const MAX_PACKED_ROWS: i64 = 4;

/// Byte `j` of a group holds column `j` in its low nibble and column `j + group / 2` in its high one, so
/// both halves meet contiguous slices of the input.
#[derive(Debug)]
pub struct Int4Matrix {
    /// u8 `[out, in / 2]`.
    codes: Tensor,
    /// `[out, in / group]`, in the compute dtype.
    scale: Tensor,
    low: Tensor,
    out_dim: i64,
    in_dim: i64,
    group: i64,
    bias: Option<Tensor>,
    kind: Kind,
}

/// Input columns per group for a width: [`INT4_GROUP`], or the largest smaller power of two dividing it.
pub fn group_for(in_dim: i64) -> Result<i64> {
    [INT4_GROUP, 32, 16, 8, 4, 2]
        .into_iter()
        .find(|g| in_dim % g == 0)
        .ok_or_else(|| Error::InvalidInput(format!("--load-4bit needs even input widths; a projection has {in_dim}")))
}

/// The packed codes `[out, in / 2]` and fp32 `scale` and `low` `[out, in / group]` of fp32 `w`.
pub fn quantize_parts(w: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (out_dim, in_dim) = w.size2()?;
    let group = group_for(in_dim)?;
    let groups = w.f_view([out_dim, in_dim / group, group])?;
    let low = groups.f_amin(&[2i64][..], true)?;
    let scale = groups.f_amax(&[2i64][..], true)?.f_sub(&low)?.f_clamp_min(1e-12)?.f_div_scalar(15.0)?;
    let codes = groups.f_sub(&low)?.f_div(&scale)?.f_round()?.f_clamp(0.0, 15.0)?.f_to_kind(Kind::Uint8)?;
    let half = group / 2;
    let codes = codes
        .f_narrow(2, 0, half)?
        .f_add(&codes.f_narrow(2, half, half)?.f_mul_scalar(16)?)?
        .f_to_kind(Kind::Uint8)?
        .f_reshape([out_dim, in_dim / 2])?
        .f_contiguous()?;
    let flat = |t: Tensor| -> Result<Tensor> { Ok(t.f_view([out_dim, in_dim / group])?.f_contiguous()?) };
    Ok((codes, flat(scale)?, flat(low)?))
}

impl Int4Matrix {
    pub fn quantize(linear: Linear) -> Result<Self> {
        let kind = linear.weight.kind();
        let (codes, scale, low) = quantize_parts(&linear.weight.f_to_kind(Kind::Float)?)?;
        Self::from_parts(codes, scale, low, linear.bias, kind)
    }

    /// The matrix of [`quantize_parts`]' tensors, computing in `kind`.
    pub fn from_parts(codes: Tensor, scale: Tensor, low: Tensor, bias: Option<Tensor>, kind: Kind) -> Result<Self> {
        let (out_dim, half_in) = codes.size2()?;
        let (scale_rows, groups) = scale.size2()?;
        let in_dim = half_in * 2;
        if scale_rows != out_dim || groups == 0 || in_dim % groups != 0 || low.size() != scale.size() {
            return Err(Error::InvalidInput(format!(
                "int4: codes {:?}, scale {:?} and low {:?} do not describe one matrix",
                codes.size(),
                scale.size(),
                low.size()
            )));
        }
        let to_kind = |t: Tensor| -> Result<Tensor> { Ok(if t.kind() == kind { t } else { t.f_to_kind(kind)? }) };
        Ok(Self {
            codes,
            scale: to_kind(scale)?.f_contiguous()?,
            low: to_kind(low)?.f_contiguous()?,
            out_dim,
            in_dim,
            group: in_dim / groups,
            bias,
            kind,
        })
    }

    pub fn shape(&self) -> [i64; 2] {
        [self.out_dim, self.in_dim]
    }

    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        size(&self.codes) + size(&self.scale) + size(&self.low) + self.bias.as_ref().map_or(0, size)
    }

    /// The weight in the compute dtype.
    pub fn expand(&self) -> Result<Tensor> {
        let (groups, half) = (self.in_dim / self.group, self.group / 2);
        let codes = self.codes.f_view([self.out_dim, groups, half])?;
        let low_codes = codes.f_bitwise_and(15)?;
        let high_codes = codes.f_bitwise_right_shift_tensor_scalar(4)?;
        let values = Tensor::f_cat(&[low_codes, high_codes], 2)?.f_to_kind(self.kind)?;
        let values = values.f_mul(&self.scale.f_unsqueeze(2)?)?.f_add(&self.low.f_unsqueeze(2)?)?;
        Ok(values.f_view([self.out_dim, self.in_dim])?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let rows = size.iter().rev().skip(1).product::<i64>();
        let packed_path = x.device() == Device::Cpu && self.kind == Kind::Float && x.kind() == Kind::Float;
        if !packed_path || rows > MAX_PACKED_ROWS || size.last() != Some(&self.in_dim) {
            return Ok(x.f_linear(&self.expand()?, self.bias.as_ref())?);
        }
        let x = x.f_contiguous()?;
        let input = tensor_slice::<f32>(&x, (rows * self.in_dim) as usize)?;
        let (out_dim, in_dim, group) = (self.out_dim as usize, self.in_dim as usize, self.group as usize);
        let codes = tensor_slice::<u8>(&self.codes, out_dim * in_dim / 2)?;
        let scale = tensor_slice::<f32>(&self.scale, out_dim * in_dim / group)?;
        let low = tensor_slice::<f32>(&self.low, out_dim * in_dim / group)?;
        let matrix = Packed { codes, scale, low, in_dim, group };
        let mut out = vec![0f32; rows as usize * out_dim];
        let threads = (tch::get_num_threads().max(1) as usize).min(out_dim / 256).max(1);
        for (x_row, out_row) in input.chunks_exact(in_dim).zip(out.chunks_exact_mut(out_dim)) {
            let sums: Vec<f32> = x_row.chunks_exact(group).map(|g| g.iter().sum()).collect();
            let per_thread = out_dim.div_ceil(threads);
            std::thread::scope(|scope| {
                for (i, part) in out_row.chunks_mut(per_thread).enumerate() {
                    let (matrix, sums) = (&matrix, &sums);
                    scope.spawn(move || matrix.rows_times(x_row, sums, i * per_thread, part));
                }
            });
        }
        let mut out_size = size.clone();
        *out_size.last_mut().expect("checked above") = self.out_dim;
        let y = Tensor::f_from_slice(&out)?.f_view(out_size.as_slice())?;
        Ok(match &self.bias {
            Some(bias) => y.f_add(bias)?,
            None => y,
        })
    }
}

/// The contiguous CPU data of `t`, checked for dtype and length.
fn tensor_slice<T: tch::kind::Element>(t: &Tensor, len: usize) -> Result<&[T]> {
    if t.kind() != T::KIND || t.device() != Device::Cpu || !t.is_contiguous() || t.numel() != len {
        return Err(Error::InvalidInput(format!(
            "int4: expected a contiguous CPU {:?} tensor of {len} values, got {:?} {:?} {:?}",
            T::KIND,
            t.kind(),
            t.device(),
            t.size()
        )));
    }
    // SAFETY: a contiguous CPU tensor of `len` elements of `T`, alive as long as the borrow of `t`.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, len) })
}

struct Packed<'a> {
    codes: &'a [u8],
    scale: &'a [f32],
    low: &'a [f32],
    in_dim: usize,
    group: usize,
}

impl Packed<'_> {
    /// `out[r] = row (first + r) . x`, with `sums` the input's sum per group.
    fn rows_times(&self, x: &[f32], sums: &[f32], first: usize, out: &mut [f32]) {
        let groups = self.in_dim / self.group;
        let half = self.group / 2;
        for (r, y) in out.iter_mut().enumerate() {
            let row = first + r;
            let codes = &self.codes[row * self.in_dim / 2..][..self.in_dim / 2];
            let (scale, low) = (&self.scale[row * groups..][..groups], &self.low[row * groups..][..groups]);
            let mut total = 0f32;
            for g in 0..groups {
                let (x_low, x_high) = x[g * self.group..][..self.group].split_at(half);
                let dot = dot_codes(&codes[g * half..][..half], x_low, x_high);
                total += scale[g] * dot + low[g] * sums[g];
            }
            *y = total;
        }
    }
}

/// `sum_j (c_j & 15) * x_low[j] + (c_j >> 4) * x_high[j]`.
fn dot_codes(codes: &[u8], x_low: &[f32], x_high: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if codes.len().is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA; the slices are as long as `codes`, a multiple of 8.
            return unsafe { dot_codes_avx2(codes, x_low, x_high) };
        }
    }
    codes.iter().zip(x_low.iter().zip(x_high)).map(|(&c, (&l, &h))| f32::from(c & 15) * l + f32::from(c >> 4) * h).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_codes_avx2(codes: &[u8], x_low: &[f32], x_high: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nibble = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    for i in (0..codes.len()).step_by(8) {
        let bytes = _mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i);
        let low = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(bytes, nibble)));
        let high = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble)));
        acc = _mm256_fmadd_ps(low, _mm256_loadu_ps(x_low.as_ptr().add(i)), acc);
        acc = _mm256_fmadd_ps(high, _mm256_loadu_ps(x_high.as_ptr().add(i)), acc);
    }
    let pair = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(out_dim: i64, in_dim: i64) -> Linear {
        tch::manual_seed(5);
        Linear { weight: Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu)), bias: None }
    }

    #[test]
    fn packed_codes_and_the_expanded_matrix_give_the_same_products() {
        for (out_dim, in_dim) in [(600, 256), (40, 96), (8, 6)] {
            let m = Int4Matrix::quantize(linear(out_dim, in_dim)).unwrap();
            for rows in [1, 3] {
                let x = Tensor::randn([1, rows, in_dim], (Kind::Float, Device::Cpu));
                let packed = m.forward(&x).unwrap();
                let expanded = x.linear(&m.expand().unwrap(), None::<Tensor>);
                let diff = (&packed - &expanded).abs().max().double_value(&[]);
                let scale = expanded.abs().max().double_value(&[]);
                assert!(diff <= scale * 1e-5, "{out_dim}x{in_dim}, {rows} rows: max |diff| {diff} of {scale}");
            }
        }
    }

    #[test]
    fn exact_grid_values_round_trip() {
        // k * 0.25 for k in -7..=8 in every group: low -1.75, scale 0.25, nothing lost.
        let row: Vec<f32> = (0..64).map(|i| ((i % 16) as f32 - 7.0) * 0.25).collect();
        let weight = Tensor::from_slice(&row).view([1, 64]);
        let m = Int4Matrix::quantize(Linear { weight: weight.shallow_clone(), bias: None }).unwrap();
        assert!(m.expand().unwrap().equal(&weight));
    }

    #[test]
    fn a_bias_is_added_on_both_paths() {
        let mut l = linear(300, 128);
        l.bias = Some(Tensor::full([300], 7.0, (Kind::Float, Device::Cpu)));
        let m = Int4Matrix::quantize(l).unwrap();
        let zero = |rows| Tensor::zeros([rows, 128], (Kind::Float, Device::Cpu));
        for rows in [1, 8] {
            let y = m.forward(&zero(rows)).unwrap();
            assert!(y.allclose(&Tensor::full([rows, 300], 7.0, (Kind::Float, Device::Cpu)), 1e-6, 1e-6, false));
        }
    }
}
