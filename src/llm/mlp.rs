//! `LlamaMLP` with MM-LoRA projections: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
use super::mmlora::{MmLoraLinear, MmLoraMode};
use crate::config::ArcanaConfig;
use crate::error::Result;
use crate::quant::WeightForms;
use crate::weights::Weights;
use tch::Tensor;

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: MmLoraLinear,
    pub up_proj: MmLoraLinear,
    pub down_proj: MmLoraLinear,
}

impl Mlp {
    pub fn load(w: &Weights, config: &ArcanaConfig, storage: WeightForms) -> Result<Self> {
        let (h, i, s) = (config.hidden_size, config.intermediate_size, MmLoraMode::from_config(config));
        Ok(Self {
            gate_proj: MmLoraLinear::load(&w.pp("gate_proj"), h, i, false, s, storage)?,
            up_proj: MmLoraLinear::load(&w.pp("up_proj"), h, i, false, s, storage)?,
            down_proj: MmLoraLinear::load(&w.pp("down_proj"), i, h, false, s, storage)?,
        })
    }

    /// silu is checked by `ArcanaConfig::validate`.
    pub fn forward(&self, x: &Tensor, visual: &Tensor) -> Result<Tensor> {
        // In place (the same kernels, so the same bits): a long prefill then holds two of these
        // [positions, intermediate] tensors at a time instead of four.
        let mut gate = self.gate_proj.forward(x, visual)?;
        let _ = gate.f_silu_()?;
        let up = self.up_proj.forward(x, visual)?;
        let _ = gate.f_mul_(&up)?;
        drop(up);
        self.down_proj.forward(&gate, visual)
    }
}
