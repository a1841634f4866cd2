//! `LlamaRotaryEmbedding` and its linear / dynamic-NTK variants (transformers 4.37.2).
//!
//! The cos/sin caches are built at construction over `max_position_embeddings` and rebuilt, as upstream,
//! whenever a forward needs more positions than cached (dynamic NTK then also changes `inv_freq`, and keeps it).
use crate::config::{ArcanaConfig, RopeScalingKind};
use crate::error::{Error, Result};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// `t = t / factor`.
    Linear(f64),
    /// Dynamic NTK: a larger base once the sequence exceeds `max_position_embeddings`.
    Dynamic(f64),
}

#[derive(Debug)]
struct Caches {
    inv_freq: Tensor,
    max_seq_len_cached: i64,
    /// `[max_seq_len_cached, dim]`, fp32 (cast to the activations' dtype on use, as upstream's `.to(x.dtype)`).
    cos_cached: Tensor,
    sin_cached: Tensor,
}

#[derive(Debug)]
pub struct RotaryEmbedding {
    pub dim: i64,
    pub max_position_embeddings: i64,
    pub base: f64,
    pub scaling: RopeScaling,
    caches: Mutex<Caches>,
}

/// `1.0 / (base ** (arange(0, dim, 2).float() / dim))`; `1.0 / t` is `t.reciprocal() * 1.0` in PyTorch.
fn inv_freq(base: f64, dim: i64, device: Device) -> Result<Tensor> {
    let exponent =
        Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, device))?.f_to_kind(Kind::Float)?.f_div_scalar(dim)?;
    Ok(Tensor::f_pow_scalar(base, &exponent)?.f_reciprocal()?.f_mul_scalar(1.0)?)
}

impl RotaryEmbedding {
    pub fn new(config: &ArcanaConfig, device: Device) -> Result<Self> {
        let scaling = match &config.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.kind {
                RopeScalingKind::Linear => RopeScaling::Linear(s.factor),
                RopeScalingKind::Dynamic => RopeScaling::Dynamic(s.factor),
            },
        };
        let dim = config.head_dim();
        let inv = inv_freq(config.rope_theta, dim, Device::Cpu)?;
        let mut rope = Self {
            dim,
            max_position_embeddings: config.max_position_embeddings,
            base: config.rope_theta,
            scaling,
            caches: Mutex::new(Caches {
                inv_freq: inv,
                max_seq_len_cached: 0,
                cos_cached: Tensor::new(),
                sin_cached: Tensor::new(),
            }),
        };
        // Built on the CPU at construction, then moved with the module (`model.to(device)`).
        let caches = rope.caches.get_mut().map_err(|_| poisoned())?;
        Self::set_cache(
            dim,
            rope.max_position_embeddings,
            rope.base,
            scaling,
            caches,
            config.max_position_embeddings,
            Device::Cpu,
        )?;
        caches.inv_freq = caches.inv_freq.f_to_device(device)?;
        caches.cos_cached = caches.cos_cached.f_to_device(device)?;
        caches.sin_cached = caches.sin_cached.f_to_device(device)?;
        Ok(rope)
    }

    /// Upstream `_set_cos_sin_cache(seq_len)`.
    fn set_cache(
        dim: i64,
        max_pos: i64,
        base: f64,
        scaling: RopeScaling,
        caches: &mut Caches,
        seq_len: i64,
        device: Device,
    ) -> Result<()> {
        caches.max_seq_len_cached = seq_len;
        if let RopeScaling::Dynamic(factor) = scaling {
            if seq_len > max_pos {
                // Python float arithmetic, as upstream.
                let base = base
                    * ((factor * seq_len as f64 / max_pos as f64) - (factor - 1.0)).powf(dim as f64 / (dim - 2) as f64);
                caches.inv_freq = inv_freq(base, dim, device)?;
            }
        }
        let mut t = Tensor::f_arange(seq_len, (Kind::Float, device))?;
        if let RopeScaling::Linear(factor) = scaling {
            t = t.f_div_scalar(factor)?;
        }
        let freqs = t.f_outer(&caches.inv_freq.f_to_device(device)?)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        caches.cos_cached = emb.f_cos()?;
        caches.sin_cached = emb.f_sin()?;
        Ok(())
    }

    /// Upstream `forward(x, seq_len)`: `(cos_cached[:seq_len], sin_cached[:seq_len])` in `kind`, rebuilding the
    /// caches first when `seq_len` exceeds them.
    pub fn cos_sin(&self, seq_len: i64, kind: Kind, device: Device) -> Result<(Tensor, Tensor)> {
        let mut caches = self.caches.lock().map_err(|_| poisoned())?;
        if seq_len > caches.max_seq_len_cached {
            Self::set_cache(
                self.dim,
                self.max_position_embeddings,
                self.base,
                self.scaling,
                &mut caches,
                seq_len,
                device,
            )?;
        }
        let cos = caches.cos_cached.f_narrow(0, 0, seq_len)?.f_to_kind(kind)?;
        let sin = caches.sin_cached.f_narrow(0, 0, seq_len)?.f_to_kind(kind)?;
        Ok((cos, sin))
    }
}

fn poisoned() -> Error {
    Error::InvalidInput("rotary embedding state poisoned by an earlier panic".into())
}

/// `cos[position_ids].unsqueeze(1)`: `[B, 1, L, dim]` for `apply_rotary_pos_emb`.
pub fn gather_positions(table: &Tensor, position_ids: &Tensor) -> Result<Tensor> {
    Ok(table.f_index(&[Some(position_ids)])?.f_unsqueeze(1)?)
}

/// `cat(-x2, x1)` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.size().last().copied().unwrap_or(0);
    let x1 = x.f_narrow(-1, 0, d / 2)?;
    let x2 = x.f_narrow(-1, d / 2, d - d / 2)?;
    Ok(Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?)
}

/// `(x * cos) + (rotate_half(x) * sin)` with `cos`/`sin` already gathered by position.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(cos)?.f_add(&rotate_half(x)?.f_mul(sin)?)?)
}
