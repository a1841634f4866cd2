//! Attention over a KV cache kept in fp16 (the compact CPU modes): `softmax(q k^T / sqrt(d) + mask) v`
//! read straight from the fp16 keys and values, with fp32 products and sums, so a decoding step reads
//! the cache once, at half the bytes of an fp32 cache.
//!
//! Each query row is computed on its own, over the keys it may see in ascending order: its result is
//! the same alone, beside other rows of a batch, and in any split of a prefill into chunks. Keys whose
//! mask value is `finfo.min` (the causal and padding masks) take no part, as their zero weight would
//! give; a row that sees no key at all (padding) gives zeros.
use crate::error::{Error, Result};
use crate::simd::f16_to_f32;
use crate::threads::split_units;
use tch::{Device, Kind, Tensor};

/// A mask value at or below this hides its key (the masks use `finfo(float32).min`).
const HIDDEN: f32 = f32::MIN / 2.0;

/// Query rows sharing each key's conversion from fp16.
const QUERY_BLOCK: usize = 4;

/// Element offsets of a 4-d tensor's dims 0, 1 and 2 (dim 3 is contiguous).
#[derive(Clone, Copy)]
struct Strides([usize; 3]);

/// A read-only view of tensor memory handed to worker threads.
#[derive(Clone, Copy)]
struct Raw<T>(*const T);
// SAFETY: the threads only read, and the tensors outlive the scope that runs them.
unsafe impl<T> Send for Raw<T> {}
unsafe impl<T> Sync for Raw<T> {}

fn strides_of(t: &Tensor, what: &str) -> Result<Strides> {
    let s = t.stride();
    if s.len() != 4 || s.iter().any(|&x| x < 0) || (t.size()[3] > 1 && s[3] != 1) {
        return Err(Error::InvalidInput(format!("fp16 attention: {what} strides {s:?}")));
    }
    Ok(Strides([s[0] as usize, s[1] as usize, s[2] as usize]))
}

/// `q` `[B, H, Lq, D]` (fp32) over `k`, `v` `[B, G, Lk, D]` (fp16, `H` a multiple of `G`), with an
/// additive `mask` broadcastable to `[B, 1, Lq, Lk]` and, for left-padded rows, each row's first key.
/// Returns `[B, H, Lq, D]` in fp32.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, row_starts: Option<&[i64]>) -> Result<Tensor> {
    let d = q.size().last().copied().unwrap_or(0).max(0) as usize;
    attend_with(Kernel::detect(d), q, k, v, mask, row_starts)
}

fn attend_with(
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    row_starts: Option<&[i64]>,
) -> Result<Tensor> {
    let (qs, ks) = (q.size(), k.size());
    let bad = || Error::InvalidInput(format!("fp16 attention: queries {qs:?}, keys {ks:?}, values {:?}", v.size()));
    if qs.len() != 4 || ks.len() != 4 || v.size() != ks || qs[0] != ks[0] || qs[3] != ks[3] {
        return Err(bad());
    }
    let [b, h, lq, d] = [qs[0], qs[1], qs[2], qs[3]].map(|x| x as usize);
    let (g, lk) = (ks[1] as usize, ks[2] as usize);
    if g == 0 || !h.is_multiple_of(g) || q.kind() != Kind::Float || k.kind() != Kind::Half || v.kind() != Kind::Half {
        return Err(bad());
    }
    if [q, k, v].iter().any(|t| t.device() != Device::Cpu) {
        return Err(Error::InvalidInput("fp16 attention runs on the CPU".into()));
    }
    let starts: Vec<usize> = match row_starts {
        Some(s) if s.len() == b && s.iter().all(|&x| (0..=lk as i64).contains(&x)) => {
            s.iter().map(|&x| x as usize).collect()
        }
        Some(s) => return Err(Error::InvalidInput(format!("fp16 attention: row starts {s:?} for {b} rows"))),
        None => vec![0; b],
    };
    let q = q.f_contiguous()?;
    let mask = match mask {
        Some(m) => {
            let m = if m.kind() == Kind::Float { m.shallow_clone() } else { m.f_to_kind(Kind::Float)? };
            let m = m.f_expand([b as i64, 1, lq as i64, lk as i64], false)?;
            Some((strides_of(&m, "mask")?, m))
        }
        None => None,
    };
    let (k_strides, v_strides) = (strides_of(k, "keys")?, strides_of(v, "values")?);
    let shape = Shape { heads_per_group: h / g, heads: h, lq, lk, d };
    let job = Job {
        q: Raw(q.data_ptr() as *const f32),
        k: Raw(k.data_ptr() as *const u16),
        v: Raw(v.data_ptr() as *const u16),
        mask: mask.as_ref().map(|(s, m)| (*s, Raw(m.data_ptr() as *const f32))),
        k_strides,
        v_strides,
        shape,
    };
    let mut out = vec![0f32; b * h * lq * d];
    let pairs = b * h;
    let threads = (tch::get_num_threads().max(1) as usize).min(pairs).max(1);
    split_units(&mut out, lq * d, threads, |first_pair, part| {
        let mut scratch = Vec::new();
        for (j, head_out) in part.chunks_mut(lq * d).enumerate() {
            let pair = first_pair + j;
            let (row, head) = (pair / h, pair % h);
            job.head(kernel, row, head, starts[row], head_out, &mut scratch);
        }
    });
    Ok(Tensor::f_from_slice(&out)?.f_view([b as i64, h as i64, lq as i64, d as i64])?)
}

#[derive(Clone, Copy)]
struct Shape {
    heads_per_group: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
}

struct Job {
    q: Raw<f32>,
    k: Raw<u16>,
    v: Raw<u16>,
    mask: Option<(Strides, Raw<f32>)>,
    k_strides: Strides,
    v_strides: Strides,
    shape: Shape,
}

impl Job {
    /// One (row, head): every query of the head over keys `start..`.
    fn head(&self, kernel: Kernel, row: usize, head: usize, start: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
        let Shape { heads_per_group, heads, lq, lk, d } = self.shape;
        let group = head / heads_per_group;
        let keys = lk - start;
        // SAFETY: offsets stay inside each tensor: row < B, group < G, positions < Lk, columns < D, and
        // the strides are the tensors' own.
        let key_base = |t: Raw<u16>, s: Strides| unsafe { t.0.add(row * s.0[0] + group * s.0[1] + start * s.0[2]) };
        let (k, v) = (key_base(self.k, self.k_strides), key_base(self.v, self.v_strides));
        let (k_step, v_step) = (self.k_strides.0[2], self.v_strides.0[2]);
        let scale = 1.0 / (d as f32).sqrt();
        scratch.resize(QUERY_BLOCK * keys, 0.0);
        let mut first = 0;
        while first < lq {
            let rows = QUERY_BLOCK.min(lq - first);
            let weights = &mut scratch[..rows * keys];
            for (r, query_weights) in weights.chunks_mut(keys).enumerate() {
                let i = first + r;
                // SAFETY: `q` is contiguous `[B, H, Lq, D]`.
                let query = unsafe { std::slice::from_raw_parts(self.q.0.add(((row * heads + head) * lq + i) * d), d) };
                let mut max = f32::NEG_INFINITY;
                for (j, w) in query_weights.iter_mut().enumerate() {
                    let hidden_by = match self.mask {
                        // SAFETY: the mask was expanded to `[B, 1, Lq, Lk]`.
                        Some((s, m)) => unsafe { *m.0.add(row * s.0[0] + i * s.0[2] + (start + j)) },
                        None => 0.0,
                    };
                    // SAFETY: key `j` of this head lies `j * k_step` elements past `k`.
                    *w = if hidden_by <= HIDDEN {
                        f32::NEG_INFINITY
                    } else {
                        let dot = unsafe { kernel.dot(query, k.add(j * k_step), d) };
                        dot * scale + hidden_by
                    };
                    max = max.max(*w);
                }
                let mut sum = 0f32;
                for w in query_weights.iter_mut() {
                    *w = if *w == f32::NEG_INFINITY { 0.0 } else { (*w - max).exp() };
                    sum += *w;
                }
                if sum > 0.0 {
                    query_weights.iter_mut().for_each(|w| *w /= sum);
                }
            }
            let block_out = &mut out[first * d..(first + rows) * d];
            block_out.fill(0.0);
            // SAFETY: value `j` of this head lies `j * v_step` elements past `v`, for every `j < keys`.
            if !unsafe { kernel.add_all_scaled_one_query(block_out, weights, v, v_step, d) } {
                for j in 0..keys {
                    // SAFETY: as above.
                    unsafe { kernel.add_scaled(block_out, weights, keys, j, v.add(j * v_step), d) };
                }
            }
            first += rows;
        }
    }
}

/// The code path for this CPU, fixed per process so that every call adds the same way.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Kernel {
    fn detect(d: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if d.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Self::Avx2;
        }
        let _ = d;
        Self::Plain
    }

    /// `q . key` for one fp16 key of `d` values.
    ///
    /// # Safety
    /// `key` points at `d` readable fp16 values.
    unsafe fn dot(self, q: &[f32], key: *const u16, d: usize) -> f32 {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::dot(q, key, d),
            Self::Plain => (0..d).map(|c| q[c] * f16_to_f32(*key.add(c))).fold(0.0, |a, x| a + x),
        }
    }

    /// For a block of one query (a decoding step): `out += weights[j] * value_j` for every key `j` in
    /// order, with the sums kept in registers across keys (the same products and additions in the same
    /// order as [`Kernel::add_scaled`] key by key, so the same bits); false where this path does not
    /// apply and nothing was done.
    ///
    /// # Safety
    /// Value `j` lies `j * v_step` fp16 values past `value` and holds `d` readable values, for each
    /// `j < weights.len()`.
    unsafe fn add_all_scaled_one_query(
        self,
        out: &mut [f32],
        weights: &[f32],
        value: *const u16,
        v_step: usize,
        d: usize,
    ) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 if out.len() == d && d.is_multiple_of(64) => {
                avx2::add_all_scaled_one_query(out, weights, value, v_step, d);
                true
            }
            _ => false,
        }
    }

    /// `out[r] += weights[r * keys + j] * value` for each query `r` of the block.
    ///
    /// # Safety
    /// `value` points at `d` readable fp16 values.
    unsafe fn add_scaled(self, out: &mut [f32], weights: &[f32], keys: usize, j: usize, value: *const u16, d: usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::add_scaled(out, weights, keys, j, value, d),
            Self::Plain => {
                for (r, row) in out.chunks_mut(d).enumerate() {
                    let w = weights[r * keys + j];
                    for (c, o) in row.iter_mut().enumerate() {
                        *o += w * f16_to_f32(*value.add(c));
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::simd::lanes_sum;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(q: &[f32], key: *const u16, d: usize) -> f32 {
        let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c + 16 <= d {
            let k0 = _mm256_cvtph_ps(_mm_loadu_si128(key.add(c) as *const __m128i));
            let k1 = _mm256_cvtph_ps(_mm_loadu_si128(key.add(c + 8) as *const __m128i));
            even = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c)), k0, even);
            odd = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c + 8)), k1, odd);
            c += 16;
        }
        if c < d {
            let k0 = _mm256_cvtph_ps(_mm_loadu_si128(key.add(c) as *const __m128i));
            even = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c)), k0, even);
        }
        lanes_sum(_mm256_add_ps(even, odd))
    }

    /// See `Kernel::add_all_scaled_one_query`: 64 columns at a time in eight accumulators, over every key.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn add_all_scaled_one_query(
        out: &mut [f32],
        weights: &[f32],
        value: *const u16,
        v_step: usize,
        d: usize,
    ) {
        let mut c = 0;
        while c < d {
            let o = out.as_mut_ptr().add(c);
            let mut acc: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(o.add(8 * i)));
            for (j, &weight) in weights.iter().enumerate() {
                let w = _mm256_set1_ps(weight);
                let v = value.add(j * v_step + c);
                for (i, sum) in acc.iter_mut().enumerate() {
                    let values = _mm256_cvtph_ps(_mm_loadu_si128(v.add(8 * i) as *const __m128i));
                    *sum = _mm256_fmadd_ps(w, values, *sum);
                }
            }
            for (i, sum) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * i), *sum);
            }
            c += 64;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn add_scaled(out: &mut [f32], weights: &[f32], keys: usize, j: usize, value: *const u16, d: usize) {
        let rows = out.len() / d;
        let mut c = 0;
        while c < d {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(value.add(c) as *const __m128i));
            for r in 0..rows {
                let w = _mm256_set1_ps(weights[r * keys + j]);
                let o = out.as_mut_ptr().add(r * d + c);
                _mm256_storeu_ps(o, _mm256_fmadd_ps(w, v, _mm256_loadu_ps(o)));
            }
            c += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// The plain libtorch computation on the same fp16 values, in float64.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, n_rep: i64) -> Tensor {
        let widen = |t: &Tensor| {
            let t = t.to_kind(Kind::Double);
            let s = t.size();
            t.unsqueeze(2).expand([s[0], s[1], n_rep, s[2], s[3]], false).reshape([s[0], s[1] * n_rep, s[2], s[3]])
        };
        let (q, k, v) = (q.to_kind(Kind::Double), widen(k), widen(v));
        let mut w = q.matmul(&k.transpose(2, 3)) / (q.size()[3] as f64).sqrt();
        if let Some(m) = mask {
            w += m.to_kind(Kind::Double);
        }
        w.softmax(-1, Kind::Double).matmul(&v)
    }

    fn min() -> Tensor {
        Tensor::full([], f64::from(f32::MIN), (Kind::Float, Device::Cpu))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b).abs().max().double_value(&[])
    }

    #[test]
    fn half_values_widen_exactly() {
        let values =
            Tensor::from_slice(&[0.0f32, -0.0, 1.0, -2.5, 65504.0, 6.0e-8, -6.1e-5, 0.333]).to_kind(Kind::Half);
        let bits: Vec<i16> = Vec::try_from(values.view_dtype(Kind::Int16)).unwrap();
        let widened: Vec<f32> = Vec::try_from(values.to_kind(Kind::Float)).unwrap();
        for (b, w) in bits.iter().zip(&widened) {
            assert_eq!(f16_to_f32(*b as u16).to_bits(), w.to_bits(), "{b:#x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn equals_the_plain_computation_on_odd_shapes_with_masks_and_groups() {
        tch::manual_seed(5);
        for (b, g, n_rep, lq, lk, d) in
            [(1, 2, 1, 1, 7, 8), (2, 2, 2, 5, 9, 24), (1, 1, 3, 6, 6, 16), (3, 4, 1, 1, 33, 128)]
        {
            let q = randn(&[b, g * n_rep, lq, d]);
            let (k, v) = (randn(&[b, g, lk, d]).to_kind(Kind::Half), randn(&[b, g, lk, d]).to_kind(Kind::Half));
            // Causal over the last `lq` keys, and a hidden key in row 0.
            let past = lk - lq;
            let allowed = Tensor::arange(lk, (Kind::Int64, Device::Cpu))
                .view([1, 1, 1, lk])
                .le_tensor(&(Tensor::arange(lq, (Kind::Int64, Device::Cpu)).view([1, 1, lq, 1]) + past))
                .expand([b, 1, lq, lk], false)
                .contiguous();
            if past > 0 {
                let _ = allowed.get(0).get(0).narrow(1, 0, 1).fill_(0);
            }
            let mask = Tensor::zeros([], (Kind::Float, Device::Cpu)).where_self(&allowed, &min());
            let want = reference(&q, &k, &v, Some(&mask), n_rep);
            for kernel in [Kernel::Plain, Kernel::detect(d as usize)] {
                let got = attend_with(kernel, &q, &k, &v, Some(&mask), None).unwrap();
                assert_eq!(got.size(), want.size());
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-5, "{b}x{g}x{n_rep} {lq}x{lk}x{d}: max |diff| {diff}");
            }
        }
    }

    #[test]
    fn a_query_gives_the_same_bits_alone_in_a_batch_and_in_any_chunk() {
        tch::manual_seed(9);
        let (lk, d) = (21, 128);
        let (k, v) = (randn(&[2, 4, lk, d]).to_kind(Kind::Half), randn(&[2, 4, lk, d]).to_kind(Kind::Half));
        let q = randn(&[2, 4, 1, d]);
        // Row 1 is left-padded by 5 keys: over its own keys it computes what it would alone.
        let both = attend(&q, &k, &v, None, Some(&[0, 5])).unwrap();
        let own = |t: &Tensor| t.narrow(0, 1, 1).narrow(2, 5, lk - 5);
        let alone = attend(&q.narrow(0, 1, 1), &own(&k), &own(&v), None, None).unwrap();
        assert!(both.narrow(0, 1, 1).equal(&alone));
        // Prefill queries with a causal mask: the last query alone equals it among all of them.
        let queries = randn(&[1, 4, 6, d]);
        let allowed = Tensor::arange(lk, (Kind::Int64, Device::Cpu))
            .view([1, 1, 1, lk])
            .le_tensor(&(Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([1, 1, 6, 1]) + (lk - 6)));
        let mask = Tensor::zeros([], (Kind::Float, Device::Cpu)).where_self(&allowed, &min());
        let (k0, v0) = (k.narrow(0, 0, 1), v.narrow(0, 0, 1));
        let all = attend(&queries, &k0, &v0, Some(&mask), None).unwrap();
        for (first, rows) in [(5, 1), (2, 3), (0, 5)] {
            let chunk_mask = mask.narrow(2, first, rows);
            let chunk = attend(&queries.narrow(2, first, rows), &k0, &v0, Some(&chunk_mask), None).unwrap();
            assert!(chunk.equal(&all.narrow(2, first, rows)), "queries {first}..{}", first + rows);
        }
        // A query's keys past its causal limit change nothing: the first query over its one key.
        let shorter =
            attend(&queries.narrow(2, 0, 1), &k0.narrow(2, 0, lk - 5), &v0.narrow(2, 0, lk - 5), None, None).unwrap();
        assert!(shorter.equal(&all.narrow(2, 0, 1)));
    }

    #[test]
    fn a_row_that_sees_no_key_gives_zeros() {
        let (k, v) = (randn(&[1, 1, 3, 8]).to_kind(Kind::Half), randn(&[1, 1, 3, 8]).to_kind(Kind::Half));
        let mask = Tensor::full([1, 1, 1, 3], f64::from(f32::MIN), (Kind::Float, Device::Cpu));
        let out = attend(&randn(&[1, 1, 1, 8]), &k, &v, Some(&mask), None).unwrap();
        assert_eq!(out.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
