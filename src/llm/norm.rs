//! `LlamaRMSNorm`.
use crate::error::Result;
use crate::weights::Weights;
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub variance_epsilon: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get("weight", &[dim])?, variance_epsilon: eps })
    }

    /// To fp32, `x * rsqrt(mean(x^2, -1) + eps)`, back to the input dtype, then `weight * x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let input_kind = x.kind();
        let h = x.f_to_kind(Kind::Float)?;
        let variance = h.f_pow_tensor_scalar(2)?.f_mean_dim(Some(&[-1i64][..]), true, None::<Kind>)?;
        let h = h.f_mul(&variance.f_add_scalar(self.variance_epsilon)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&h.f_to_kind(input_kind)?)?)
    }
}
