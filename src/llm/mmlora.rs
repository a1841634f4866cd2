//! The release's MM-LoRA projection (`SLoRA` in `language_model/modeling_llama_mmlora.py`) at inference:
//!
//! ```text
//! res = x W^T
//! res[visual]  += V_B(V_A(x[visual])) * scaling
//! res[~visual] += L_B(L_A(x[~visual])) * scaling
//! ```
//! with the same boolean-mask gathers and scatters, visual branch first. A branch whose mask selects
//! nothing runs on position 0 and adds its result times 0, as the release does.
//!
//! With the language branch merged (`arcana-convert --merge-lora`, `W' = W + s * L_B L_A`), language
//! positions take `x W'^T` alone and visual ones `x W'^T + s * (V_B V_A x - L_B L_A x)`: the same
//! function up to rounding, with no LoRA work for language tokens (every decode step).
use crate::config::ArcanaConfig;
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::quant::{BaseWeight, LinearStorage, Quantization, WeightForms};
use crate::weights::Weights;
use tch::{Kind, Tensor};

/// Field names as the release's attributes (and checkpoint names).
#[allow(non_snake_case)]
#[derive(Debug)]
pub struct MmLoraLinear {
    pub base: BaseWeight,
    pub V_Slora_A: BaseWeight,
    pub V_Slora_B: BaseWeight,
    pub L_Slora_A: BaseWeight,
    pub L_Slora_B: BaseWeight,
    pub scaling: f64,
    /// `base` already holds the language branch.
    pub language_merged: bool,
}

/// How a projection applies its branches (from the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MmLoraMode {
    pub scaling: f64,
    pub language_merged: bool,
}

impl MmLoraMode {
    pub fn from_config(config: &ArcanaConfig) -> Self {
        Self { scaling: config.lora_scaling(), language_merged: config.mm_lora_language_merged }
    }
}

/// One of a projection's two LoRA branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// `V_Slora_*`, for image positions.
    Visual,
    /// `L_Slora_*`, for text positions.
    Language,
}

impl Branch {
    /// The branch's checkpoint names under its projection, down then up.
    fn names(self) -> [&'static str; 2] {
        match self {
            Self::Visual => ["V_Slora_A", "V_Slora_B"],
            Self::Language => ["L_Slora_A", "L_Slora_B"],
        }
    }

    /// How the projections' form `compact` (none in the exact modes) keeps this branch: compact where
    /// it runs at image positions only (the visual branch, and the language branch once merged, which
    /// only the visual correction reads), so that no decoding step expands it; dense where it runs at
    /// every text position. Beside fp16 projections it is fp16; beside int8 and int4 ones, int8 codes
    /// made from its fp16 values (a small correction, so its rounding weighs little beside the
    /// projections'). A pre-quantized folder stores the compact branches in fp16 either way. Exact
    /// modes keep every branch as the checkpoint gives it.
    pub fn storage(self, compact: Option<Quantization>, language_merged: bool) -> LinearStorage {
        let image_only = self == Self::Visual || language_merged;
        match compact {
            Some(_) if !image_only => LinearStorage::Dense,
            Some(Quantization::Fp16) => LinearStorage::Fp16,
            Some(Quantization::Int8 | Quantization::Int4) => LinearStorage::Int8,
            None => LinearStorage::Dense,
        }
    }

    /// The branch whose weight `name` is (`….V_Slora_A.weight` and the like).
    pub fn of_weight(name: &str) -> Option<Self> {
        let module = name.strip_suffix(".weight")?;
        [Self::Visual, Self::Language]
            .into_iter()
            .find(|b| b.names().iter().any(|n| module.ends_with(&format!(".{n}"))))
    }
}

/// The rank of `branch` under the projection `w`, from its down weight's shape.
fn lora_rank(w: &Weights, branch: Branch) -> Result<i64> {
    Ok(w.pp(branch.names()[0]).shape("weight")?.first().copied().unwrap_or(-1))
}

/// `branch`'s down/up pair (`[rank, in]`, `[out, rank]`), kept as `storage` says.
fn load_pair(
    w: &Weights,
    branch: Branch,
    in_dim: i64,
    out_dim: i64,
    storage: LinearStorage,
) -> Result<(BaseWeight, BaseWeight)> {
    let ([a, b], rank) = (branch.names(), lora_rank(w, branch)?);
    let down = BaseWeight::load(&w.pp(a), in_dim, rank, false, storage)?;
    let up = BaseWeight::load(&w.pp(b), rank, out_dim, false, storage)?;
    Ok((down, up))
}

/// `branch`'s down/up weights as copies whose file pages are dropped at once (a branch merged at load).
fn read_pair_transient(w: &Weights, branch: Branch, in_dim: i64, out_dim: i64) -> Result<(Tensor, Tensor)> {
    let ([a, b], rank) = (branch.names(), lora_rank(w, branch)?);
    Ok((w.pp(a).get_transient("weight", &[rank, in_dim])?, w.pp(b).get_transient("weight", &[out_dim, rank])?))
}

/// `W + scale * B @ A` in fp32 (`A`: `[r, in]`, `B`: `[out, r]`): a LoRA update folded into a weight.
/// `arcana-convert` (`--merge-lora`, adapters) and `merge_low_rank` compute it the same way.
pub fn add_low_rank(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let (a, b) = (a.f_to_kind(Kind::Float)?, b.f_to_kind(Kind::Float)?);
    Ok(weight.f_to_kind(Kind::Float)?.f_add(&b.f_matmul(&a)?.f_mul_scalar(scale)?)?)
}

/// `add_low_rank` rounded once to `W`'s dtype: the language branch merged into the base weight at load.
pub fn merge_low_rank(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(add_low_rank(weight, a, b, scale)?.f_to_kind(weight.kind())?)
}

impl MmLoraLinear {
    /// `w` points at the projection (`model.layers.N.self_attn.q_proj`); `storage` is applied at once.
    pub fn load(
        w: &Weights,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        mode: MmLoraMode,
        storage: WeightForms,
    ) -> Result<Self> {
        let compact = storage.storage;
        let merge = !storage.prequantized && storage.merge_lora && !mode.language_merged;
        let language_merged = mode.language_merged || merge;
        let language_storage = Branch::Language.storage(compact, language_merged);
        let (va, vb) = load_pair(w, Branch::Visual, in_dim, out_dim, Branch::Visual.storage(compact, language_merged))?;
        let (base, la, lb) = if storage.prequantized {
            let stored = storage
                .storage
                .ok_or_else(|| Error::InvalidInput("a pre-quantized checkpoint needs its quantization mode".into()))?;
            let base = BaseWeight::load_compact(w, stored, in_dim, out_dim, bias)?;
            let (la, lb) = load_pair(w, Branch::Language, in_dim, out_dim, language_storage)?;
            (base, la, lb)
        } else {
            // A weight that is converted here is read as a transient copy: its file pages must not stay mapped.
            let mut base = if compact.is_some() || merge {
                let weight = w.get_transient("weight", &[out_dim, in_dim])?;
                Linear { weight, bias: if bias { Some(w.get("bias", &[out_dim])?) } else { None } }
            } else {
                Linear::load(w, in_dim, out_dim, bias)?
            };
            let (la, lb) = if merge {
                // Folded in from the checkpoint's values, then kept as the merged branch runs.
                let (down, up) = read_pair_transient(w, Branch::Language, in_dim, out_dim)?;
                base.weight = merge_low_rank(&base.weight, &down, &up, mode.scaling)?;
                let keep = |weight| BaseWeight::stored(Linear { weight, bias: None }, language_storage);
                (keep(down)?, keep(up)?)
            } else {
                load_pair(w, Branch::Language, in_dim, out_dim, language_storage)?
            };
            let base = match storage.storage {
                Some(q) => BaseWeight::quantized(base, q)?,
                None => BaseWeight::Dense(base),
            };
            (base, la, lb)
        };
        let scaling = mode.scaling;
        Ok(Self { base, V_Slora_A: va, V_Slora_B: vb, L_Slora_A: la, L_Slora_B: lb, scaling, language_merged })
    }

    /// Each branch's down and up weights.
    pub fn branches(&self) -> [(Branch, [&BaseWeight; 2]); 2] {
        [(Branch::Visual, [&self.V_Slora_A, &self.V_Slora_B]), (Branch::Language, [&self.L_Slora_A, &self.L_Slora_B])]
    }

    /// `x`: `[B, L, in]`; `visual`: bool `[B, L]`.
    pub fn forward(&self, x: &Tensor, visual: &Tensor) -> Result<Tensor> {
        let (xs, ms) = (x.size(), visual.size());
        if xs.len() != 3 || ms.len() != 2 || xs[..2] != ms[..] {
            return Err(Error::InvalidInput(format!("MM-LoRA: input {xs:?} and visual mask {ms:?} do not match")));
        }
        let mut res = self.base.forward(x)?;
        if self.language_merged {
            self.add_visual_correction(&mut res, x, visual)?;
            return Ok(res);
        }
        self.add_branch(&mut res, x, visual, &self.V_Slora_A, &self.V_Slora_B)?;
        let language = visual.f_logical_not()?;
        self.add_branch(&mut res, x, &language, &self.L_Slora_A, &self.L_Slora_B)?;
        Ok(res)
    }

    /// `res[visual] += s * (V_B V_A x - L_B L_A x)`; nothing at all when no position is visual.
    fn add_visual_correction(&self, res: &mut Tensor, x: &Tensor, visual: &Tensor) -> Result<()> {
        if visual.f_any()?.f_int64_value(&[])? == 0 {
            return Ok(());
        }
        let part = x.f_index(&[Some(visual)])?;
        let v = self.V_Slora_B.forward(&self.V_Slora_A.forward(&part)?)?;
        let l = self.L_Slora_B.forward(&self.L_Slora_A.forward(&part)?)?;
        let delta = v.f_sub(&l)?.f_mul_scalar(self.scaling)?;
        let updated = res.f_index(&[Some(visual)])?.f_add(&delta)?;
        let _ = res.f_index_put_(&[Some(visual)], &updated, false)?;
        Ok(())
    }

    fn add_branch(&self, res: &mut Tensor, x: &Tensor, mask: &Tensor, a: &BaseWeight, b: &BaseWeight) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn linear(out_dim: i64, in_dim: i64) -> Linear {
        Linear { weight: Tensor::randn([out_dim, in_dim], (Kind::Double, Device::Cpu)), bias: None }
    }

    /// An unmerged projection and its `--merge-lora` twin (`W' = W + s * L_B L_A`), in float64.
    fn pair() -> (MmLoraLinear, MmLoraLinear) {
        tch::manual_seed(11);
        let (w, va, vb, la, lb) = (linear(6, 8), linear(3, 8), linear(6, 3), linear(5, 8), linear(6, 5));
        let s = 2.0;
        let merged_w = &w.weight + lb.weight.matmul(&la.weight) * s;
        let copy = |l: &Linear| BaseWeight::Dense(Linear { weight: l.weight.copy(), bias: None });
        let dense = BaseWeight::Dense;
        let merged = MmLoraLinear {
            base: BaseWeight::Dense(Linear { weight: merged_w, bias: None }),
            V_Slora_A: copy(&va),
            V_Slora_B: copy(&vb),
            L_Slora_A: copy(&la),
            L_Slora_B: copy(&lb),
            scaling: s,
            language_merged: true,
        };
        let plain = MmLoraLinear {
            base: BaseWeight::Dense(w),
            V_Slora_A: dense(va),
            V_Slora_B: dense(vb),
            L_Slora_A: dense(la),
            L_Slora_B: dense(lb),
            scaling: s,
            language_merged: false,
        };
        (plain, merged)
    }

    #[test]
    fn merged_language_branch_computes_the_same_function() {
        let (plain, merged) = pair();
        let x = Tensor::randn([2, 7, 8], (Kind::Double, Device::Cpu));
        let visual = Tensor::from_slice(&[
            false, true, true, false, true, false, false, true, false, false, true, true, false, false,
        ])
        .view([2, 7]);
        for mask in
            [visual, Tensor::zeros([2, 7], (Kind::Bool, Device::Cpu)), Tensor::ones([2, 7], (Kind::Bool, Device::Cpu))]
        {
            let (a, b) = (plain.forward(&x, &mask).unwrap(), merged.forward(&x, &mask).unwrap());
            let diff = (&a - &b).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "max |diff| {diff}");
        }
    }

    #[test]
    fn merged_language_positions_take_the_base_weight_alone() {
        let (_, merged) = pair();
        let x = Tensor::randn([1, 1, 8], (Kind::Double, Device::Cpu));
        let language = Tensor::zeros([1, 1], (Kind::Bool, Device::Cpu));
        let out = merged.forward(&x, &language).unwrap();
        assert!(out.equal(&merged.base.forward(&x).unwrap()));
    }
}
