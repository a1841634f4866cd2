//! The release's MM-LoRA projection (`SLoRA` in `language_model/modeling_llama_mmlora.py`) at inference:
//!
//! ```text
//! res = x W^T
//! res[visual]  += V_B(V_A(x[visual])) * scaling
//! res[~visual] += L_B(L_A(x[~visual])) * scaling
//! ```
//! with the same boolean-mask gathers and scatters, visual branch first. A branch whose mask selects
//! nothing runs on position 0 and adds its result times 0, as the release does.
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::llm::quant::BaseWeight;
use crate::weights::Weights;
use tch::Tensor;

/// Field names as the release's attributes (and checkpoint names).
#[allow(non_snake_case)]
#[derive(Debug)]
pub struct MmLoraLinear {
    pub base: BaseWeight,
    pub V_Slora_A: Linear,
    pub V_Slora_B: Linear,
    pub L_Slora_A: Linear,
    pub L_Slora_B: Linear,
    pub scaling: f64,
}

/// A LoRA down/up pair whose rank the checkpoint decides.
fn load_pair(w: &Weights, a: &str, b: &str, in_dim: i64, out_dim: i64) -> Result<(Linear, Linear)> {
    let down = Linear::load_any_rank(&w.pp(a), Some(in_dim), None)?;
    let rank = down.out_dim();
    let up = Linear::load_any_rank(&w.pp(b), Some(rank), Some(out_dim))?;
    Ok((down, up))
}

impl MmLoraLinear {
    /// `w` points at the projection (`model.layers.N.self_attn.q_proj`).
    pub fn load(w: &Weights, in_dim: i64, out_dim: i64, bias: bool, scaling: f64) -> Result<Self> {
        let base = BaseWeight::Dense(Linear::load(w, in_dim, out_dim, bias)?);
        let (va, vb) = load_pair(w, "V_Slora_A", "V_Slora_B", in_dim, out_dim)?;
        let (la, lb) = load_pair(w, "L_Slora_A", "L_Slora_B", in_dim, out_dim)?;
        Ok(Self { base, V_Slora_A: va, V_Slora_B: vb, L_Slora_A: la, L_Slora_B: lb, scaling })
    }

    pub fn rank_visual(&self) -> i64 {
        self.V_Slora_A.out_dim()
    }

    pub fn rank_language(&self) -> i64 {
        self.L_Slora_A.out_dim()
    }

    /// `x`: `[B, L, in]`; `visual`: bool `[B, L]`.
    pub fn forward(&self, x: &Tensor, visual: &Tensor) -> Result<Tensor> {
        let (xs, ms) = (x.size(), visual.size());
        if xs.len() != 3 || ms.len() != 2 || xs[..2] != ms[..] {
            return Err(Error::InvalidInput(format!("MM-LoRA: input {xs:?} and visual mask {ms:?} do not match")));
        }
        let mut res = self.base.forward(x)?;
        self.add_branch(&mut res, x, visual, &self.V_Slora_A, &self.V_Slora_B)?;
        let language = visual.f_logical_not()?;
        self.add_branch(&mut res, x, &language, &self.L_Slora_A, &self.L_Slora_B)?;
        Ok(res)
    }

    fn add_branch(&self, res: &mut Tensor, x: &Tensor, mask: &Tensor, a: &Linear, b: &Linear) -> Result<()> {
        if mask.f_any()?.f_int64_value(&[])? != 0 {
            // `res[mask] += b(a(x[mask])) * s`: gather, add, scatter back (index, add_, index_put_).
            let part = x.f_index(&[Some(mask)])?;
            let delta = b.forward(&a.forward(&part)?)?.f_mul_scalar(self.scaling)?;
            let updated = res.f_index(&[Some(mask)])?.f_add(&delta)?;
            let _ = res.f_index_put_(&[Some(mask)], &updated, false)?;
        } else {
            // `res[:, :1] += b(a(x[:, :1])) * 0`
            let part = x.f_narrow(1, 0, 1)?;
            let delta = b.forward(&a.forward(&part)?)?.f_mul_scalar(0)?;
            let mut head = res.f_narrow(1, 0, 1)?;
            let _ = head.f_add_(&delta)?;
        }
        Ok(())
    }
}
