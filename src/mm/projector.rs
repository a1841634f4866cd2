//! The multimodal projector (`multimodal_projector/builder.py`): `linear`, `mlpNx_gelu` or `identity`.
use crate::config::{ArcanaConfig, ProjectorKind};
use crate::error::Result;
use crate::layers::Linear;
use crate::weights::Weights;
use tch::Tensor;

#[derive(Debug)]
pub enum Projector {
    /// `nn.Linear` stored directly as `mm_projector.{weight,bias}`.
    Linear(Linear),
    /// `nn.Sequential(Linear, GELU, Linear, ...)`: linears at even indices 0, 2, 4, ...
    MlpGelu(Vec<Linear>),
    Identity,
}

impl Projector {
    /// `w` points at `model.mm_projector`.
    pub fn load(w: &Weights, config: &ArcanaConfig) -> Result<Self> {
        let (input, hidden) = (config.mm_hidden_size, config.hidden_size);
        Ok(match config.projector_kind() {
            ProjectorKind::Linear => Self::Linear(Linear::load(w, input, hidden, true)?),
            ProjectorKind::Identity => Self::Identity,
            ProjectorKind::MlpGelu(depth) => {
                let mut linears = vec![Linear::load(&w.pp(0), input, hidden, true)?];
                for i in 1..depth.max(1) {
                    linears.push(Linear::load(&w.pp(2 * i), hidden, hidden, true)?);
                }
                Self::MlpGelu(linears)
            }
        })
    }

    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(linear) => linear.forward(features),
            Self::Identity => Ok(features.shallow_clone()),
            Self::MlpGelu(linears) => {
                let mut x = linears[0].forward(features)?;
                for linear in &linears[1..] {
                    // nn.GELU() defaults to the exact erf form.
                    x = linear.forward(&x.f_gelu("none")?)?;
                }
                Ok(x)
            }
        }
    }
}
