//! Sampling as transformers 4.37.2 `generate(do_sample=True)` does it: the warpers temperature, top-k
//! and top-p in that order (`_get_logits_warper`), then `softmax` and libtorch's `multinomial` on the
//! default generator, so a run seeded with `tch::manual_seed` draws what a seeded Python run draws.
use crate::config::read_json;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Kind, Tensor};

/// What chooses the next token from the last position's fp32 logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// `argmax` (first index wins ties).
    Greedy,
    Sample(SamplingParams),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Applied unless it is 1.0.
    pub temperature: f64,
    /// 0 turns top-k off.
    pub top_k: i64,
    /// Applied when below 1.0.
    pub top_p: f64,
}

/// The sampling fields of `generation_config.json` (Vicuna's sets `top_p: 0.6`).
#[derive(Deserialize, Default)]
struct SamplingFile {
    top_k: Option<i64>,
    top_p: Option<f64>,
}

impl Decoding {
    /// The release's rule: sample when the temperature is above 0, else greedy. Unset top-k / top-p come
    /// from the model's `generation_config.json`, then from GenerationConfig's defaults (50, 1.0).
    pub fn for_cli(model_dir: &Path, temperature: f64, top_k: Option<i64>, top_p: Option<f64>) -> Result<Self> {
        if !(temperature >= 0.0) || !temperature.is_finite() {
            return Err(Error::InvalidInput(format!("temperature must be a finite number >= 0, got {temperature}")));
        }
        if temperature == 0.0 {
            return Ok(Self::Greedy);
        }
        let path = model_dir.join("generation_config.json");
        let file: SamplingFile = if path.is_file() { read_json(&path)? } else { SamplingFile::default() };
        let params = SamplingParams {
            temperature,
            top_k: top_k.or(file.top_k).unwrap_or(50),
            top_p: top_p.or(file.top_p).unwrap_or(1.0),
        };
        if params.top_k < 0 {
            return Err(Error::InvalidInput(format!("top-k must be >= 0, got {}", params.top_k)));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return Err(Error::InvalidInput(format!("top-p must be in (0, 1], got {}", params.top_p)));
        }
        Ok(Self::Sample(params))
    }

}

impl crate::generate::NextToken for Decoding {
    /// Next token per row from `[batch, vocab]` fp32 scores.
    fn next_tokens(&self, scores: &Tensor) -> Result<Vec<i64>> {
        let chosen = match self {
            Self::Greedy => scores.f_argmax(-1, false)?,
            Self::Sample(params) => {
                let probs = warp(scores, params)?.f_softmax(-1, Kind::Float)?;
                probs.f_multinomial(1, false)?.f_squeeze_dim(1)?
            }
        };
        Ok(Vec::<i64>::try_from(chosen.f_to_device(tch::Device::Cpu)?)?)
    }
}

/// The warpers of `_get_logits_warper` for one beam (`min_tokens_to_keep = 1`).
pub fn warp(scores: &Tensor, params: &SamplingParams) -> Result<Tensor> {
    let mut scores = scores.shallow_clone();
    if params.temperature != 1.0 {
        scores = scores.f_div_scalar(params.temperature)?;
    }
    if params.top_k != 0 {
        // TopKLogitsWarper: drop scores below the k-th largest.
        let k = params.top_k.min(scores.size()[scores.dim() - 1]);
        let (values, _) = scores.f_topk(k, -1, true, true)?;
        let kth = values.f_narrow(-1, k - 1, 1)?;
        scores = scores.f_masked_fill(&scores.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?;
    }
    if params.top_p < 1.0 {
        // TopPLogitsWarper: ascending sort, drop the low tail whose mass is <= 1 - top_p, keep the largest.
        let (sorted, indices) = scores.f_sort(-1, false)?;
        let cumulative = sorted.f_softmax(-1, Kind::Float)?.f_cumsum(-1, Kind::Float)?;
        let remove_sorted = cumulative.f_le(1.0 - params.top_p)?;
        let vocab = remove_sorted.size()[remove_sorted.dim() - 1];
        let _ = remove_sorted.f_narrow(-1, vocab - 1, 1)?.f_fill_(0)?;
        let remove = remove_sorted.f_scatter(1, &indices, &remove_sorted)?;
        scores = scores.f_masked_fill(&remove, f64::NEG_INFINITY)?;
    }
    Ok(scores)
}
