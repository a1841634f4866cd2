//! Weight-only quantization of the decoder's base projections (`--load-8bit`, `--load-4bit`).
//!
//! Weights are stored as integers with floating point scales and expanded to the compute dtype on each
//! forward; activations, the MM-LoRA branches, norms, embeddings and `lm_head` stay in the compute dtype.
//! - int8: symmetric, one scale per output channel (`max |w_row| / 127`).
//! - int4: asymmetric, one scale and zero point per group of `INT4_GROUP` input columns (fewer where the
//!   width is not a multiple of it): `scale = (max - min) / 15`, values 0..=15 stored two per byte.
//!
//! This is not bitsandbytes' LLM.int8() / NF4: results are close to, not equal to, the release's.
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::llm::{LlamaForCausalLM, MmLoraLinear};
use tch::{Kind, Tensor};

/// Input columns sharing one int4 scale (as common 4-bit schemes use).
pub const INT4_GROUP: i64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    Int8,
    Int4,
}

/// A linear layer's weight, dense or quantized.
#[derive(Debug)]
pub enum BaseWeight {
    Dense(Linear),
    Int8 { q: Tensor, scale: Tensor, bias: Option<Tensor>, kind: Kind },
    Int4 { packed: Tensor, scale: Tensor, zero: Tensor, in_dim: i64, group: i64, bias: Option<Tensor>, kind: Kind },
}

impl BaseWeight {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) => linear.forward(x),
            Self::Int8 { q, scale, bias, kind } => {
                let weight = q.f_to_kind(*kind)?.f_mul(scale)?;
                Ok(x.f_linear(&weight, bias.as_ref())?)
            }
            Self::Int4 { packed, scale, zero, in_dim, group, bias, kind } => {
                let weight = unpack_int4(packed, scale, zero, *in_dim, *group, *kind)?;
                Ok(x.f_linear(&weight, bias.as_ref())?)
            }
        }
    }

    /// Bytes held by the weight (and its scales).
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        match self {
            Self::Dense(l) => size(&l.weight),
            Self::Int8 { q, scale, .. } => size(q) + size(scale),
            Self::Int4 { packed, scale, zero, .. } => size(packed) + size(scale) + size(zero),
        }
    }

    pub fn quantize(&mut self, mode: Quantization) -> Result<()> {
        let Self::Dense(linear) = self else {
            return Err(Error::InvalidInput("the weight is already quantized".into()));
        };
        let kind = linear.weight.kind();
        let bias = linear.bias.as_ref().map(Tensor::shallow_clone);
        let w = linear.weight.f_to_kind(Kind::Float)?;
        *self = match mode {
            Quantization::Int8 => {
                let scale = w.f_abs()?.f_amax(&[1i64][..], true)?.f_clamp_min(1e-12)?.f_div_scalar(127.0)?;
                let q = w.f_div(&scale)?.f_round()?.f_clamp(-127.0, 127.0)?.f_to_kind(Kind::Int8)?;
                Self::Int8 { q, scale: scale.f_to_kind(kind)?, bias, kind }
            }
            Quantization::Int4 => {
                let (out_dim, in_dim) = w.size2()?;
                let group = [INT4_GROUP, 32, 16, 8, 4, 2].into_iter().find(|g| in_dim % g == 0).ok_or_else(|| {
                    Error::InvalidInput(format!("--load-4bit needs even input widths; a projection has {in_dim}"))
                })?;
                let groups = w.f_view([out_dim, in_dim / group, group])?;
                let low = groups.f_amin(&[2i64][..], true)?;
                let high = groups.f_amax(&[2i64][..], true)?;
                let scale = high.f_sub(&low)?.f_clamp_min(1e-12)?.f_div_scalar(15.0)?;
                let zero = low.f_div(&scale)?.f_neg()?.f_round()?.f_clamp(0.0, 15.0)?;
                let q = groups.f_div(&scale)?.f_round()?.f_add(&zero)?.f_clamp(0.0, 15.0)?.f_to_kind(Kind::Uint8)?;
                let q = q.f_view([out_dim, in_dim / 2, 2])?;
                let packed = q.f_select(2, 0)?.f_add(&q.f_select(2, 1)?.f_mul_scalar(16)?)?.f_to_kind(Kind::Uint8)?;
                let zero = zero.f_to_kind(Kind::Uint8)?;
                Self::Int4 { packed, scale: scale.f_to_kind(kind)?, zero, in_dim, group, bias, kind }
            }
        };
        Ok(())
    }
}

fn unpack_int4(packed: &Tensor, scale: &Tensor, zero: &Tensor, in_dim: i64, group: i64, kind: Kind) -> Result<Tensor> {
    let out_dim = packed.size()[0];
    let wide = packed.f_to_kind(Kind::Int16)?;
    let low = wide.f_remainder(16)?;
    let high = wide.f_floor_divide_scalar(16)?;
    let values = Tensor::f_stack(&[low, high], 2)?.f_view([out_dim, in_dim / group, group])?;
    let values = values.f_sub(&zero.f_to_kind(Kind::Int16)?)?.f_to_kind(kind)?.f_mul(scale)?;
    Ok(values.f_view([out_dim, in_dim])?)
}

impl LlamaForCausalLM {
    /// Quantizes every decoder projection's base weight in place; returns (bytes before, bytes after).
    pub fn quantize(&mut self, mode: Quantization) -> Result<(usize, usize)> {
        let (mut before, mut after) = (0, 0);
        for layer in &mut self.model.layers {
            let attn = &mut layer.self_attn;
            let mlp = &mut layer.mlp;
            let projections: [&mut MmLoraLinear; 7] = [
                &mut attn.q_proj,
                &mut attn.k_proj,
                &mut attn.v_proj,
                &mut attn.o_proj,
                &mut mlp.gate_proj,
                &mut mlp.up_proj,
                &mut mlp.down_proj,
            ];
            for projection in projections {
                before += projection.base.bytes();
                projection.base.quantize(mode)?;
                after += projection.base.bytes();
            }
        }
        Ok((before, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn dense(out_dim: i64, in_dim: i64) -> BaseWeight {
        tch::manual_seed(3);
        let weight = Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu));
        BaseWeight::Dense(Linear { weight, bias: None })
    }

    fn relative_error(mode: Quantization) -> f64 {
        let mut w = dense(16, 128);
        let x = Tensor::randn([2, 5, 128], (Kind::Float, Device::Cpu));
        let exact = w.forward(&x).unwrap();
        w.quantize(mode).unwrap();
        let approx = w.forward(&x).unwrap();
        let err = (&approx - &exact).abs().max().double_value(&[]);
        err / exact.abs().max().double_value(&[])
    }

    #[test]
    fn int8_and_int4_stay_close_and_int8_is_closer() {
        let (e8, e4) = (relative_error(Quantization::Int8), relative_error(Quantization::Int4));
        assert!(e8 < 0.02, "int8 relative error {e8}");
        assert!(e4 < 0.2, "int4 relative error {e4}");
        assert!(e8 < e4);
    }

    #[test]
    fn quantized_weights_are_smaller() {
        let mut w = dense(16, 128);
        let dense_bytes = w.bytes();
        w.quantize(Quantization::Int4).unwrap();
        assert!(w.bytes() * 4 < dense_bytes, "{} vs {dense_bytes}", w.bytes());
    }

    #[test]
    fn int4_round_trips_exact_grid_values() {
        // Values k * 0.25 for k in -7..=8: the group's scale is exactly 0.25, so packing loses nothing.
        let row: Vec<f32> = (0..64).map(|i| ((i % 16) as f32 - 7.0) * 0.25).collect();
        let weight = Tensor::from_slice(&row).view([1, 64]);
        let mut w = BaseWeight::Dense(Linear { weight: weight.shallow_clone(), bias: None });
        w.quantize(Quantization::Int4).unwrap();
        let BaseWeight::Int4 { packed, scale, zero, in_dim, group, kind, .. } = &w else { panic!("int4") };
        let back = unpack_int4(packed, scale, zero, *in_dim, *group, *kind).unwrap();
        assert!(back.equal(&weight));
    }
}
