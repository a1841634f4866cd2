//! The next token from the last position's fp32 logits. Temperature 0 is greedy (`argmax`, the first
//! index wins ties); above 0 it samples as transformers 4.37.2 `generate(do_sample=True)` does: the
//! warpers temperature, top-k and top-p in that order (`_get_logits_warper`), then `softmax` and
//! libtorch's `multinomial` on the default generator, so a run seeded with `tch::manual_seed` draws
//! what a seeded Python run draws.
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenChooser {
    /// 0 is greedy; otherwise applied unless it is 1.0.
    temperature: f64,
    /// 0 turns top-k off.
    top_k: i64,
    /// Applied when below 1.0.
    top_p: f64,
}

impl TokenChooser {
    /// `argmax` of the scores.
    pub const GREEDY: TokenChooser = TokenChooser { temperature: 0.0, top_k: 0, top_p: 1.0 };

    /// Top-k and top-p only matter when sampling, so a temperature of 0 accepts any of them.
    pub fn new(temperature: f64, top_k: i64, top_p: f64) -> Result<Self> {
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(Error::InvalidInput(format!("temperature must be a finite number >= 0, got {temperature}")));
        }
        if temperature == 0.0 {
            return Ok(Self::GREEDY);
        }
        if top_k < 0 {
            return Err(Error::InvalidInput(format!("top-k must be >= 0, got {top_k}")));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::InvalidInput(format!("top-p must be in (0, 1], got {top_p}")));
        }
        Ok(Self { temperature, top_k, top_p })
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Next token per row from `[batch, vocab]` fp32 scores.
    pub fn choose(&self, scores: &Tensor) -> Result<Vec<i64>> {
        let chosen = if self.is_greedy() {
            scores.f_argmax(-1, false)?
        } else {
            let probs = self.warp(scores)?.f_softmax(-1, Kind::Float)?;
            probs.f_multinomial(1, false)?.f_squeeze_dim(1)?
        };
        Ok(Vec::<i64>::try_from(chosen.f_to_device(tch::Device::Cpu)?)?)
    }

    /// The scores divided by the temperature when sampling (`TemperatureLogitsWarper`); greedy
    /// choice reads them as they are.
    pub fn tempered(&self, scores: &Tensor) -> Result<Tensor> {
        if self.temperature != 1.0 && !self.is_greedy() {
            return Ok(scores.f_div_scalar(self.temperature)?);
        }
        Ok(scores.shallow_clone())
    }

    /// The warpers of `_get_logits_warper` for one beam (`min_tokens_to_keep = 1`).
    pub fn warp(&self, scores: &Tensor) -> Result<Tensor> {
        let mut scores = self.tempered(scores)?;
        if self.top_k != 0 {
            // TopKLogitsWarper: drop scores below the k-th largest.
            let k = self.top_k.min(scores.size()[scores.dim() - 1]);
            let (values, _) = scores.f_topk(k, -1, true, true)?;
            let kth = values.f_narrow(-1, k - 1, 1)?;
            scores = scores.f_masked_fill(&scores.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?;
        }
        if self.top_p < 1.0 {
            // TopPLogitsWarper: ascending sort, drop the low tail whose mass is <= 1 - top_p, keep the largest.
            let (sorted, indices) = scores.f_sort(-1, false)?;
            let cumulative = sorted.f_softmax(-1, Kind::Float)?.f_cumsum(-1, Kind::Float)?;
            let remove_sorted = cumulative.f_le(1.0 - self.top_p)?;
            let vocab = remove_sorted.size()[remove_sorted.dim() - 1];
            let _ = remove_sorted.f_narrow(-1, vocab - 1, 1)?.f_fill_(0)?;
            let remove = remove_sorted.f_scatter(1, &indices, &remove_sorted)?;
            scores = scores.f_masked_fill(&remove, f64::NEG_INFINITY)?;
        }
        Ok(scores)
    }
}
