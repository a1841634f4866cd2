//! fp32 `x W^T` for a batched decoding step: a few input rows (one token of each answer), each weight
//! row read from memory once for all of them. At these shapes libtorch's GEMM costs about 3x one row's
//! for 8 rows of a 4096x11008 projection (it re-reads the weights per row block), while a step is bound
//! by reading the weights: here 8 rows cost little more than one.
//!
//! Only steps of 2..=[`MAX_ROWS`] rows take it; a request alone (one row, or a prefill) keeps libtorch's
//! kernels, bit for bit the release's. Each output is summed in one fixed order (eight lanes over the
//! input columns, the lanes added pairwise, the odd columns last) that depends neither on the other rows
//! nor on the thread split: a row's result is the same in every batch that takes this path.
use crate::error::Result;
use crate::quant::tensor_slice;
use crate::threads::split_units;
use tch::{Device, Kind, Tensor};

/// The most rows a step sends here; larger inputs are GEMMs that libtorch runs well.
pub const MAX_ROWS: i64 = 16;

/// Whether `x W^T` takes this path: `x` a `[rows, 1, in]` fp32 CPU decoding step of 2..=16 rows and
/// `weight` an fp32 CPU `[out, in]` matrix.
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    let size = x.size();
    let rows = size.first().copied().unwrap_or(0);
    size.len() == 3
        && size[1] == 1
        && (2..=MAX_ROWS).contains(&rows)
        && x.kind() == Kind::Float
        && x.device() == Device::Cpu
        && weight.kind() == Kind::Float
        && weight.device() == Device::Cpu
        && weight.dim() == 2
        && weight.size()[1] == size[2]
}

/// `x W^T + bias` for an input that [`applies`].
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let size = x.size();
    let (rows, in_dim) = (size[0] as usize, size[2] as usize);
    let out_dim = weight.size()[0] as usize;
    let (x, weight) = (x.f_contiguous()?, weight.f_contiguous()?);
    let input = tensor_slice::<f32>(&x, rows * in_dim)?;
    let matrix = tensor_slice::<f32>(&weight, out_dim * in_dim)?;
    // Output-major, `out_t[o * rows + r]`, so that each thread owns whole weight rows.
    let mut out_t = vec![0f32; rows * out_dim];
    let threads = (tch::get_num_threads().max(1) as usize).min(out_dim / 64).max(1);
    let kernel = Kernel::detect();
    split_units(&mut out_t, rows, threads, |first, part| {
        let outputs = part.len() / rows;
        let mut o = 0;
        while o < outputs {
            let pair = (outputs - o).min(2);
            let w = &matrix[(first + o) * in_dim..(first + o + pair) * in_dim];
            kernel.tile(input, w, in_dim, rows, &mut part[o * rows..(o + pair) * rows]);
            o += pair;
        }
    });
    let y = Tensor::f_from_slice(&out_t)?.f_view([out_dim as i64, rows as i64])?.f_transpose(0, 1)?.f_contiguous()?;
    let y = y.f_view([rows as i64, 1, out_dim as i64])?;
    Ok(match bias {
        Some(bias) => y.f_add(bias)?,
        None => y,
    })
}

/// The code path for this CPU, fixed per process so that every call adds the same way.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Self::Avx2;
        }
        Self::Plain
    }

    /// `out[j * rows + r] = x_r . w_j` for the one or two weight rows `w_j` of `w` and every input row.
    fn tile(self, x: &[f32], w: &[f32], in_dim: usize, rows: usize, out: &mut [f32]) {
        match self {
            // SAFETY: the CPU has AVX2 and FMA (checked in `detect`); the slices hold `rows` input rows
            // and `out.len() / rows` weight rows of `in_dim` values, as `linear` cuts them.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::tile(x, w, in_dim, rows, out) },
            Self::Plain => {
                for (j, w_row) in w.chunks_exact(in_dim).enumerate() {
                    for (r, x_row) in x.chunks_exact(in_dim).enumerate() {
                        out[j * rows + r] = plain_dot(x_row, w_row);
                    }
                }
            }
        }
    }
}

/// Eight partial sums over the columns, as the AVX2 path keeps its lanes, added pairwise, then the
/// columns past the last multiple of eight.
fn plain_dot(x: &[f32], w: &[f32]) -> f32 {
    let whole = x.len() / 8 * 8;
    let mut lanes = [0f32; 8];
    for (xs, ws) in x[..whole].chunks_exact(8).zip(w[..whole].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += xs[l] * ws[l];
        }
    }
    let quads: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    let pairs = [quads[0] + quads[2], quads[1] + quads[3]];
    let mut sum = pairs[0] + pairs[1];
    for (a, b) in x[whole..].iter().zip(&w[whole..]) {
        sum += a * b;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::simd::lanes_sum;
    use std::arch::x86_64::*;

    /// Input rows per pass over a pair of weight rows: 4 x 2 accumulators, two weight vectors and the
    /// input vectors fit AVX2's 16 registers.
    const ROWS_PER_PASS: usize = 4;

    /// See `Kernel::tile`.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `x` holds `rows * in_dim` values, `w` one or two rows of `in_dim`
    /// and `out` `rows` values per weight row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(x: &[f32], w: &[f32], in_dim: usize, rows: usize, out: &mut [f32]) {
        let pair = w.len() / in_dim;
        let mut r = 0;
        while r < rows {
            let block = (rows - r).min(ROWS_PER_PASS);
            match (pair, block) {
                (2, 4) => pass::<2, 4>(x, w, in_dim, rows, r, out),
                (2, 3) => pass::<2, 3>(x, w, in_dim, rows, r, out),
                (2, 2) => pass::<2, 2>(x, w, in_dim, rows, r, out),
                (2, _) => pass::<2, 1>(x, w, in_dim, rows, r, out),
                (_, 4) => pass::<1, 4>(x, w, in_dim, rows, r, out),
                (_, 3) => pass::<1, 3>(x, w, in_dim, rows, r, out),
                (_, 2) => pass::<1, 2>(x, w, in_dim, rows, r, out),
                _ => pass::<1, 1>(x, w, in_dim, rows, r, out),
            }
            r += block;
        }
    }

    /// `W` weight rows against the `R` input rows from `first`: one accumulator per pair, stepping
    /// through the columns eight at a time, so every output is summed the same way whatever `W`, `R`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pass<const W: usize, const R: usize>(
        x: &[f32],
        w: &[f32],
        in_dim: usize,
        rows: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let whole = in_dim / 8 * 8;
        let (xp, wp) = (x.as_ptr().add(first * in_dim), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); R]; W];
        let mut c = 0;
        while c < whole {
            let mut weights = [_mm256_setzero_ps(); W];
            for (j, v) in weights.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(j * in_dim + c));
            }
            for r in 0..R {
                let input = _mm256_loadu_ps(xp.add(r * in_dim + c));
                for (sums, weight) in acc.iter_mut().zip(&weights) {
                    sums[r] = _mm256_fmadd_ps(input, *weight, sums[r]);
                }
            }
            c += 8;
        }
        for j in 0..W {
            for r in 0..R {
                let mut sum = lanes_sum(acc[j][r]);
                for k in whole..in_dim {
                    sum += *xp.add(r * in_dim + k) * *wp.add(j * in_dim + k);
                }
                out[j * rows + first + r] = sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x W^T` in float64 from the same fp32 values.
    fn reference(x: &Tensor, w: &Tensor) -> Tensor {
        x.to_kind(Kind::Double).matmul(&w.to_kind(Kind::Double).tr())
    }

    #[test]
    fn every_shape_matches_float64_and_a_row_does_not_depend_on_the_others() {
        tch::manual_seed(3);
        for (rows, in_dim, out_dim) in [(2, 8, 1), (3, 13, 5), (5, 64, 7), (8, 4096, 130), (16, 1001, 3), (9, 7, 2)] {
            let x = Tensor::randn([rows, 1, in_dim], (Kind::Float, Device::Cpu));
            let w = Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu));
            let bias = Tensor::randn([out_dim], (Kind::Float, Device::Cpu));
            assert!(applies(&x, &w));
            let y = linear(&x, &w, Some(&bias)).unwrap();
            assert_eq!(y.size(), [rows, 1, out_dim]);
            let expected = reference(&x, &w) + bias.to_kind(Kind::Double);
            // fp32 sums of `in_dim` products of N(0, 1) values: rounding grows like sqrt(in_dim) * eps.
            let limit = 1e-5 * (in_dim as f64).sqrt();
            let diff = (y.to_kind(Kind::Double) - expected).abs().max().double_value(&[]);
            assert!(diff < limit, "rows {rows}, in {in_dim}, out {out_dim}: max |diff| {diff} (limit {limit})");
            // Row 1 among other rows, and beside row 0 alone: the same bits.
            let pair = linear(&x.narrow(0, 0, 2), &w, Some(&bias)).unwrap();
            assert!(pair.get(1).equal(&y.get(1)), "rows {rows}, in {in_dim}: row 1 depends on its neighbours");
        }
    }

    #[test]
    fn the_plain_path_matches_float64_with_the_same_layout() {
        tch::manual_seed(5);
        let (rows, in_dim, out_dim) = (3usize, 21usize, 2usize);
        let x = Tensor::randn([rows as i64, 1, in_dim as i64], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([out_dim as i64, in_dim as i64], (Kind::Float, Device::Cpu));
        let (xs, ws) =
            (Vec::<f32>::try_from(x.flatten(0, -1)).unwrap(), Vec::<f32>::try_from(w.flatten(0, -1)).unwrap());
        let mut out = vec![0f32; rows * out_dim];
        Kernel::Plain.tile(&xs, &ws, in_dim, rows, &mut out);
        let expected =
            Vec::<f64>::try_from(reference(&x, &w).view([rows as i64, out_dim as i64]).tr().flatten(0, -1)).unwrap();
        for (got, want) in out.iter().zip(&expected) {
            assert!((f64::from(*got) - want).abs() < 1e-4, "{got} vs {want}");
        }
    }

    #[test]
    fn only_batched_fp32_decoding_steps_take_it() {
        let w = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu));
        let x = |shape: &[i64], kind| Tensor::zeros(shape, (kind, Device::Cpu));
        assert!(applies(&x(&[2, 1, 8], Kind::Float), &w));
        assert!(!applies(&x(&[1, 1, 8], Kind::Float), &w), "a request alone keeps libtorch's kernels");
        assert!(!applies(&x(&[2, 3, 8], Kind::Float), &w), "a prefill is a GEMM");
        assert!(!applies(&x(&[17, 1, 8], Kind::Float), &w));
        assert!(!applies(&x(&[2, 1, 8], Kind::Double), &w));
        assert!(!applies(&x(&[2, 1, 7], Kind::Float), &w));
        assert!(!applies(&x(&[2, 8], Kind::Float), &w));
    }
}
