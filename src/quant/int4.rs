//! 4-bit weights (`--load-4bit`): codes 0..=15 in groups of input columns, each group with a scale and a
//! low end in fp16 (4.5 bits per weight in all), `w = code * scale + low`. Decoding steps (a few input
//! rows) read the packed codes directly on the CPU, so each token reads half a byte per weight; longer
//! inputs (prefill) and other devices expand the matrix to the compute dtype and run the ordinary GEMM,
//! where the expansion is a small share.
//!
//! The packed path multiplies integers: each input row is quantized per group of columns to int8 with
//! its own scale (as llama.cpp's q4 x q8 dot products do), so a group's dot product is one sum of
//! `code * x_code` products, exact in i32, scaled once. The codes are centred on 8 for it,
//! `w = (code - 8) * scale + mid` with `mid = low + 8 * scale`: `y = sum_g w_scale_g * x_scale_g *
//! (dot_g - 8 * sum(x_code_g)) + mid_g * sum(x_g)`, the middles against the plain fp32 sums, so the
//! inputs' rounding only touches the part of each weight around its group's middle (against the low end,
//! the error was about twice as large: 1.3% of the output on Gaussian weights instead of 0.6%). A row's result never depends on the
//! other rows of the call. The codes are read once for up to [`ROWS_PER_PASS`] input rows.
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::quant::{half_bits, tensor_slice};
use crate::simd::{f16_to_f32, widen_f16};
use crate::threads::split_units;
use tch::{Device, Kind, Tensor};

/// Input columns per group where the width allows it (as common 4-bit schemes use).
pub const INT4_GROUP: i64 = 64;

/// Inputs with at most this many rows take the packed-code path on the CPU (decoding steps of a batch).
const MAX_PACKED_ROWS: i64 = 16;

/// The fp32 weights a prefill expands at once (a block of output rows).
const EXPANDED_BLOCK_BYTES: i64 = 32 << 20;

/// Input rows multiplied in one pass over the codes: two rows' two sets of accumulators and the codes
/// fit AVX2's 16 registers (with four rows a pass took longer than two passes of two).
const ROWS_PER_PASS: usize = 2;

/// Byte `j` of a group holds column `j` in its low nibble and column `j + group / 2` in its high one, so
/// both halves meet contiguous slices of the input.
#[derive(Debug)]
pub struct Int4Matrix {
    /// u8 `[out, in / 2]`.
    codes: Tensor,
    /// fp16 `[out, in / group]`.
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

/// The packed codes `[out, in / 2]` and fp16 `scale` and `low` `[out, in / group]` of fp32 `w`. The codes
/// are chosen against the scale and low end as fp16 holds them, so that they fit the stored values.
pub fn quantize_parts(w: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (out_dim, in_dim) = w.size2()?;
    let group = group_for(in_dim)?;
    let groups = w.f_view([out_dim, in_dim / group, group])?;
    let half = |t: Tensor| -> Result<Tensor> { Ok(t.f_clamp(-65504.0, 65504.0)?.f_to_kind(Kind::Half)?) };
    let low = half(groups.f_amin(&[2i64][..], true)?)?;
    let stored_low = low.f_to_kind(Kind::Float)?;
    let scale = half(groups.f_amax(&[2i64][..], true)?.f_sub(&stored_low)?.f_div_scalar(15.0)?)?;
    // A scale that fp16 rounds to zero leaves every code at the low end (a group narrower than 1e-6).
    let step = scale.f_to_kind(Kind::Float)?.f_clamp_min(1e-12)?;
    let codes = groups.f_sub(&stored_low)?.f_div(&step)?.f_round()?.f_clamp(0.0, 15.0)?.f_to_kind(Kind::Uint8)?;
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
        let half = |t: Tensor| -> Result<Tensor> { Ok(t.f_to_kind(Kind::Half)?.f_contiguous()?) };
        Ok(Self { codes, scale: half(scale)?, low: half(low)?, out_dim, in_dim, group: in_dim / groups, bias, kind })
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
        if self.codes.device() == Device::Cpu && self.kind == Kind::Float {
            return self.expand_rows_on_cpu(0, self.out_dim);
        }
        let (groups, half) = (self.in_dim / self.group, self.group / 2);
        let codes = self.codes.f_view([self.out_dim, groups, half])?;
        let low_codes = codes.f_bitwise_and(15)?;
        let high_codes = codes.f_bitwise_right_shift_tensor_scalar(4)?;
        let values = Tensor::f_cat(&[low_codes, high_codes], 2)?.f_to_kind(self.kind)?;
        let (scale, low) = (self.scale.f_to_kind(self.kind)?, self.low.f_to_kind(self.kind)?);
        let values = values.f_mul(&scale.f_unsqueeze(2)?)?.f_add(&low.f_unsqueeze(2)?)?;
        Ok(values.f_view([self.out_dim, self.in_dim])?)
    }

    /// Rows `first..first + count` of [`Int4Matrix::expand`]'s matrix in one pass over their codes,
    /// written straight into the fp32 rows by the compute threads: `code * scale + low`, rounded after
    /// the product and after the sum as the tensor operations round, so both give the same values;
    /// without their five full-size temporaries (a prefill expands every matrix once per forward).
    fn expand_rows_on_cpu(&self, first: i64, count: i64) -> Result<Tensor> {
        let (out_dim, in_dim, group) = (self.out_dim as usize, self.in_dim as usize, self.group as usize);
        let (first, count) = (first as usize, count as usize);
        if first + count > out_dim {
            return Err(Error::InvalidInput(format!("int4: rows {first}..{} of {out_dim}", first + count)));
        }
        let codes = tensor_slice::<u8>(&self.codes, out_dim * in_dim / 2)?;
        let (scale, low) = self.scale_and_low(out_dim * in_dim / group)?;
        let values = Tensor::f_empty([count as i64, self.in_dim], (Kind::Float, Device::Cpu))?;
        // SAFETY: a new contiguous fp32 tensor of `count * in_dim` values, written only here.
        let out = unsafe { std::slice::from_raw_parts_mut(values.data_ptr() as *mut f32, count * in_dim) };
        let threads = (tch::get_num_threads().max(1) as usize).min(count).max(1);
        let half = group / 2;
        split_units(out, in_dim, threads, |part_row, part| {
            let first_group = (first + part_row) * in_dim / group;
            for (g, columns) in part.chunks_exact_mut(group).enumerate() {
                let at = first_group + g;
                let (s, l) = (f16_to_f32(scale[at]), f16_to_f32(low[at]));
                let bytes = &codes[at * half..(at + 1) * half];
                let (low_half, high_half) = columns.split_at_mut(half);
                for ((byte, lo), hi) in bytes.iter().zip(low_half).zip(high_half) {
                    *lo = f32::from(byte & 15) * s + l;
                    *hi = f32::from(byte >> 4) * s + l;
                }
            }
        });
        Ok(values)
    }

    /// `x W^T` for many rows on the CPU: the fp32 matrix is expanded a block of output rows at a time,
    /// each block multiplied at once into its columns of the output, so that a prefill holds a block
    /// (about [`EXPANDED_BLOCK_BYTES`]) instead of the whole fp32 matrix (180 MB for 11008 x 4096).
    fn forward_expanding_blocks(&self, x: &Tensor, block_bytes: i64) -> Result<Tensor> {
        let size = x.size();
        let rows = x.f_reshape([-1, self.in_dim])?;
        let out = Tensor::f_empty([rows.size()[0], self.out_dim], (Kind::Float, Device::Cpu))?;
        let block = (block_bytes / (self.in_dim * 4)).max(1);
        let mut first = 0;
        while first < self.out_dim {
            let count = block.min(self.out_dim - first);
            let weight = self.expand_rows_on_cpu(first, count)?;
            let bias = self.bias.as_ref().map(|b| b.f_narrow(0, first, count)).transpose()?;
            out.f_narrow(1, first, count)?.f_copy_(&rows.f_linear(&weight, bias.as_ref())?)?;
            first += count;
        }
        let mut out_size = size;
        *out_size.last_mut().expect("checked by the caller") = self.out_dim;
        Ok(out.f_view(out_size.as_slice())?)
    }

    /// The fp16 scales and low ends as their bits.
    fn scale_and_low(&self, len: usize) -> Result<(&[u16], &[u16])> {
        Ok((half_bits(&self.scale, len)?, half_bits(&self.low, len)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let rows = size.iter().rev().skip(1).product::<i64>();
        let cpu_fp32 = x.device() == Device::Cpu && self.kind == Kind::Float && x.kind() == Kind::Float;
        if !cpu_fp32 || size.last() != Some(&self.in_dim) {
            return Ok(x.f_linear(&self.expand()?, self.bias.as_ref())?);
        }
        if rows > MAX_PACKED_ROWS {
            return self.forward_expanding_blocks(x, EXPANDED_BLOCK_BYTES);
        }
        let x = x.f_contiguous()?;
        let input = tensor_slice::<f32>(&x, (rows * self.in_dim) as usize)?;
        let (out_dim, in_dim, group) = (self.out_dim as usize, self.in_dim as usize, self.group as usize);
        let codes = tensor_slice::<u8>(&self.codes, out_dim * in_dim / 2)?;
        let (scale, low) = self.scale_and_low(out_dim * in_dim / group)?;
        let matrix = Packed { codes, scale, low, in_dim, group };
        let quantized: Vec<QuantizedRow> =
            input.chunks_exact(in_dim).map(|row| QuantizedRow::new(row, group)).collect();
        // Output-major: `out_t[o * rows + r]`, so that each thread owns whole weight rows.
        let mut out_t = vec![0f32; rows as usize * out_dim];
        let threads = (tch::get_num_threads().max(1) as usize).min(out_dim / 256).max(1);
        split_units(&mut out_t, rows as usize, threads, |first, part| matrix.rows_times(&quantized, first, part));
        let y = Tensor::f_from_slice(&out_t)?.f_view([self.out_dim, rows])?.f_transpose(0, 1)?.f_contiguous()?;
        let mut out_size = size.clone();
        *out_size.last_mut().expect("checked above") = self.out_dim;
        let y = y.f_view(out_size.as_slice())?;
        Ok(match &self.bias {
            Some(bias) => y.f_add(bias)?,
            None => y,
        })
    }
}

struct Packed<'a> {
    codes: &'a [u8],
    /// fp16 bits.
    scale: &'a [u16],
    low: &'a [u16],
    in_dim: usize,
    group: usize,
}

/// One input row quantized per group: `x ~ codes * scale`, codes in -127..=127, with what the centring
/// of the weight codes needs per group: the plain sum `sums` (against the low ends) and
/// `8 * (sum(x) - scale * sum(codes))` (against the weight scales).
struct QuantizedRow {
    codes: Vec<i8>,
    scale: Vec<f32>,
    sums: Vec<f32>,
    centring: Vec<f32>,
}

impl QuantizedRow {
    fn new(x: &[f32], group: usize) -> Self {
        let groups = x.len() / group;
        let (mut codes, mut scale, mut sums) = (vec![0i8; x.len()], vec![0f32; groups], vec![0f32; groups]);
        let mut centring = vec![0f32; groups];
        for (g, values) in x.chunks_exact(group).enumerate() {
            let largest = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            sums[g] = values.iter().sum();
            if largest > 0.0 {
                scale[g] = largest / 127.0;
                let inverse = 127.0 / largest;
                for (code, v) in codes[g * group..][..group].iter_mut().zip(values) {
                    *code = (v * inverse).round() as i8;
                }
            }
            let code_sum: i32 = codes[g * group..][..group].iter().map(|&c| i32::from(c)).sum();
            centring[g] = 8.0 * (sums[g] - scale[g] * code_sum as f32);
        }
        Self { codes, scale, sums, centring }
    }
}

/// `sum_g mid_g * sum(x_g) - 8 * scale_g * x_scale_g * sum(x_code_g)` with `mid = low + 8 * scale`, as
/// `low . sums + scale . centring`: what turns the plain code dot products into those of the centred
/// codes, plus the middles' part. Eight lanes, so that the sums vectorize.
fn centring(scale: &[f32], low: &[f32], x: &QuantizedRow) -> f32 {
    let mut lanes = [0f32; 8];
    let whole = scale.len() / 8 * 8;
    for (((s, l), a), b) in
        scale.chunks_exact(8).zip(low.chunks_exact(8)).zip(x.sums.chunks_exact(8)).zip(x.centring.chunks_exact(8))
    {
        for i in 0..8 {
            lanes[i] += l[i] * a[i] + s[i] * b[i];
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for g in whole..scale.len() {
        total += low[g] * x.sums[g] + scale[g] * x.centring[g];
    }
    total
}

impl Packed<'_> {
    /// `out[(o - first) * rows + r] = row o . x_r` for the output rows `first..` that `out` covers.
    fn rows_times(&self, xs: &[QuantizedRow], first: usize, out: &mut [f32]) {
        let (groups, half) = (self.in_dim / self.group, self.group / 2);
        let rows = xs.len();
        let (mut scale, mut low) = (vec![0f32; groups], vec![0f32; groups]);
        for (o, y) in out.chunks_exact_mut(rows).enumerate() {
            let row = first + o;
            let codes = &self.codes[row * self.in_dim / 2..][..self.in_dim / 2];
            widen_f16(&self.scale[row * groups..][..groups], &mut scale);
            widen_f16(&self.low[row * groups..][..groups], &mut low);
            let (scale, low) = (&scale[..], &low[..]);
            for (pass, y) in xs.chunks(ROWS_PER_PASS).zip(y.chunks_mut(ROWS_PER_PASS)) {
                let mut dots = [0f32; ROWS_PER_PASS];
                scaled_dots(codes, scale, half, pass, &mut dots);
                for ((y, x), dot) in y.iter_mut().zip(pass).zip(dots) {
                    *y = dot + centring(scale, low, x);
                }
            }
        }
    }
}

/// `dots[r] = sum_g scale[g] * x_r.scale[g] * sum_j code_j * x_r.code_j` over one weight row's groups.
fn scaled_dots(codes: &[u8], scale: &[f32], half: usize, xs: &[QuantizedRow], dots: &mut [f32; ROWS_PER_PASS]) {
    #[cfg(target_arch = "x86_64")]
    {
        if half == 32 && std::arch::is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA; groups are 64 columns, 32 bytes of codes.
            unsafe { scaled_dots_avx2(codes, scale, xs, dots) };
            return;
        }
    }
    scaled_dots_plain(codes, scale, half, xs, dots);
}

/// The same sums with plain integer arithmetic, for any group size.
fn scaled_dots_plain(codes: &[u8], scale: &[f32], half: usize, xs: &[QuantizedRow], dots: &mut [f32; ROWS_PER_PASS]) {
    for (r, x) in xs.iter().enumerate() {
        let mut total = 0f32;
        for (g, group_codes) in codes.chunks_exact(half).enumerate() {
            let (x_low, x_high) = x.codes[g * 2 * half..][..2 * half].split_at(half);
            let dot: i32 = group_codes
                .iter()
                .zip(x_low.iter().zip(x_high))
                .map(|(&c, (&l, &h))| i32::from(c & 15) * i32::from(l) + i32::from(c >> 4) * i32::from(h))
                .sum();
            total += scale[g] * x.scale[g] * dot as f32;
        }
        dots[r] = total;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_dots_avx2(codes: &[u8], scale: &[f32], xs: &[QuantizedRow], dots: &mut [f32; ROWS_PER_PASS]) {
    // One instance per row count, so that the accumulators stay in registers.
    match xs.len() {
        1 => scaled_dots_rows::<1>(codes, scale, xs, dots),
        _ => scaled_dots_rows::<2>(codes, scale, xs, dots),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn scaled_dots_rows<const R: usize>(
    codes: &[u8],
    scale: &[f32],
    xs: &[QuantizedRow],
    dots: &mut [f32; ROWS_PER_PASS],
) {
    use std::arch::x86_64::*;
    let nibble = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let x_codes: [*const i8; R] = std::array::from_fn(|r| xs[r].codes.as_ptr());
    let x_scales: [*const f32; R] = std::array::from_fn(|r| xs[r].scale.as_ptr());
    // `acc[r] += (sum of the group's code products) * w_scale * x_scale` for one group.
    let group = |g: usize, acc: &mut [__m256; R]| {
        let packed = _mm256_loadu_si256(codes.as_ptr().add(g * 32) as *const __m256i);
        let low_codes = _mm256_and_si256(packed, nibble);
        let high_codes = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
        let w_scale = _mm256_broadcast_ss(&*scale.as_ptr().add(g));
        for r in 0..R {
            let x_low = _mm256_loadu_si256(x_codes[r].add(g * 64) as *const __m256i);
            let x_high = _mm256_loadu_si256(x_codes[r].add(g * 64 + 32) as *const __m256i);
            // u8 codes (at most 15) times s8 inputs: pairs sum to at most 3810, no i16 saturation.
            let pairs =
                _mm256_add_epi16(_mm256_maddubs_epi16(low_codes, x_low), _mm256_maddubs_epi16(high_codes, x_high));
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            let both = _mm256_mul_ps(w_scale, _mm256_broadcast_ss(&*x_scales[r].add(g)));
            acc[r] = _mm256_fmadd_ps(sums, both, acc[r]);
        }
    };
    // Two groups per iteration into separate accumulators, so that a row's additions do not wait on each
    // other; every row count sums in this order, so a row's result is the same alone and in a batch.
    let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let groups = scale.len();
    let mut g = 0;
    while g + 1 < groups {
        group(g, &mut even);
        group(g + 1, &mut odd);
        g += 2;
    }
    if g < groups {
        group(g, &mut even);
    }
    for r in 0..R {
        dots[r] = crate::simd::lanes_sum(_mm256_add_ps(even[r], odd[r]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(out_dim: i64, in_dim: i64) -> Linear {
        tch::manual_seed(5);
        Linear { weight: Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu)), bias: None }
    }

    /// The packed kernel's sums computed plainly in f64 from the same codes and quantized inputs.
    fn reference(m: &Int4Matrix, x: &Tensor) -> Vec<f64> {
        let (out_dim, in_dim, group) = (m.out_dim as usize, m.in_dim as usize, m.group as usize);
        let (groups, half) = (in_dim / group, group / 2);
        let codes = Vec::<u8>::try_from(m.codes.flatten(0, -1)).unwrap();
        let scale = Vec::<f32>::try_from(m.scale.flatten(0, -1).to_kind(Kind::Float)).unwrap();
        let low = Vec::<f32>::try_from(m.low.flatten(0, -1).to_kind(Kind::Float)).unwrap();
        let input = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        let mut out = Vec::new();
        for row in input.chunks_exact(in_dim) {
            let q = QuantizedRow::new(row, group);
            for o in 0..out_dim {
                let mut total = 0f64;
                for g in 0..groups {
                    let mut dot = 0i64;
                    for j in 0..half {
                        let c = codes[o * in_dim / 2 + g * half + j];
                        dot += i64::from(c & 15) * i64::from(q.codes[g * group + j]);
                        dot += i64::from(c >> 4) * i64::from(q.codes[g * group + half + j]);
                    }
                    let (w_scale, w_low) = (f64::from(scale[o * groups + g]), f64::from(low[o * groups + g]));
                    let code_sum: i64 = q.codes[g * group..][..group].iter().map(|&c| i64::from(c)).sum();
                    let centred = dot - 8 * code_sum;
                    total += w_scale * f64::from(q.scale[g]) * centred as f64
                        + (w_low + 8.0 * w_scale) * f64::from(q.sums[g]);
                }
                out.push(total);
            }
        }
        out
    }

    #[test]
    fn the_packed_kernel_equals_a_plain_reference_on_odd_shapes() {
        // Widths of every group size (64, 32, 16, 2), odd and small output counts, one to 16 rows.
        for (out_dim, in_dim) in [(1, 64), (7, 96), (257, 4160), (600, 256), (300, 48), (8, 6), (513, 128)] {
            let m = Int4Matrix::quantize(linear(out_dim, in_dim)).unwrap();
            for rows in [1, 3, 4, 5, 9, 16] {
                let x = Tensor::randn([rows, in_dim], (Kind::Float, Device::Cpu));
                let got = Vec::<f32>::try_from(m.forward(&x).unwrap().flatten(0, -1)).unwrap();
                let want = reference(&m, &x);
                let largest = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                let diff = got.iter().zip(&want).fold(0f64, |a, (g, w)| a.max((f64::from(*g) - w).abs()));
                // fp32 accumulation in another order than f64's: about 1e-7 of the largest output.
                assert!(diff <= largest * 1e-5, "{out_dim}x{in_dim}, {rows} rows: max |diff| {diff} of {largest}");
            }
        }
    }

    #[test]
    fn the_packed_kernel_stays_close_to_the_expanded_matrix() {
        for (out_dim, in_dim) in [(600, 256), (40, 96), (256, 4096)] {
            let m = Int4Matrix::quantize(linear(out_dim, in_dim)).unwrap();
            let x = Tensor::randn([1, 3, in_dim], (Kind::Float, Device::Cpu));
            let packed = m.forward(&x).unwrap();
            let expanded = x.linear(&m.expand().unwrap(), None::<Tensor>);
            let rel = (&packed - &expanded).norm().double_value(&[]) / expanded.norm().double_value(&[]);
            // The inputs' int8 grid per group: measured 0.0056-0.0067 relative (norm) on these shapes
            // with Gaussian inputs (`cargo test --lib int4 -- --nocapture`).
            println!("{out_dim}x{in_dim}: packed against expanded, relative {rel:.5}");
            assert!(rel < 0.01, "{out_dim}x{in_dim}: relative {rel}");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_among_others() {
        let m = Int4Matrix::quantize(linear(300, 256)).unwrap();
        let factors = Tensor::from_slice(&[1.0f32, 50.0, 1e-3, 0.0, 7.0, 1.0, 2.0]).view([7, 1]);
        let x = Tensor::randn([7, 256], (Kind::Float, Device::Cpu)) * factors;
        let together = m.forward(&x).unwrap();
        for i in 0..7 {
            assert!(m.forward(&x.narrow(0, i, 1)).unwrap().equal(&together.narrow(0, i, 1)), "row {i}");
        }
    }

    #[test]
    fn the_cpu_expansion_equals_the_tensor_operations() {
        for (out_dim, in_dim) in [(3, 64), (17, 96), (5, 200), (300, 128)] {
            let m = Int4Matrix::quantize(linear(out_dim, in_dim)).unwrap();
            let (groups, half) = (m.in_dim / m.group, m.group / 2);
            let codes = m.codes.view([m.out_dim, groups, half]);
            let values = Tensor::cat(&[codes.bitwise_and(15), codes.bitwise_right_shift_tensor_scalar(4)], 2)
                .to_kind(Kind::Float)
                * m.scale.to_kind(Kind::Float).unsqueeze(2)
                + m.low.to_kind(Kind::Float).unsqueeze(2);
            assert!(m.expand().unwrap().equal(&values.view([m.out_dim, m.in_dim])), "{out_dim}x{in_dim}");
        }
    }

    #[test]
    fn a_prefill_expanding_blocks_of_rows_computes_the_whole_matrix_product() {
        for (out_dim, in_dim) in [(300, 128), (17, 96), (1000, 64)] {
            let m = Int4Matrix::quantize(linear(out_dim, in_dim)).unwrap();
            let x = Tensor::randn([2, 20, in_dim], (Kind::Float, Device::Cpu));
            let whole = x.linear(&m.expand().unwrap(), None::<Tensor>);
            assert!(m.forward(&x).unwrap().equal(&whole), "{out_dim}x{in_dim}: one block");
            // Blocks of 7 rows, the last one shorter.
            let blocks = m.forward_expanding_blocks(&x, 7 * in_dim * 4).unwrap();
            let rel = (&blocks - &whole).norm().double_value(&[]) / whole.norm().double_value(&[]);
            assert!(rel < 1e-6, "{out_dim}x{in_dim}: blocks of 7 rows, relative {rel}");
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
