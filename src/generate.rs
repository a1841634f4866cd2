//! Greedy decoding as transformers 4.37.2 `generate(inputs_embeds=..., do_sample=False)` runs it for the
//! release: ids start as `[[bos]]` (the prompt is given as embeddings only), the first step runs every
//! prompt position (positions from the padding mask: `cumsum - 1`, padded positions 1), then one token
//! per step with the KV cache; argmax of the last position's fp32 logits (first index wins ties);
//! finished rows are filled with the pad id; stop when every row met EOS or after `max_new_tokens`.
use crate::config::{read_json, ArcanaConfig};
use crate::error::{Error, Result};
use crate::llm::mask::{prefill_visual_mask, MaskPolicy};
use crate::llm::{KvCache, LlamaForCausalLM, StepInputs};
use crate::mm::splice::Spliced;
use serde::Deserialize;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: i64,
    pub eos_token_ids: Vec<i64>,
    /// Fills finished rows; transformers falls back to the first EOS id.
    pub pad_token_id: Option<i64>,
    pub max_new_tokens: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize, Default)]
struct GenerationConfigFile {
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
}

impl GenerationConfig {
    /// Ids from `generation_config.json` when the folder has one, else from the model config.
    pub fn from_model_dir(dir: &Path, config: &ArcanaConfig, max_new_tokens: usize) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let file: GenerationConfigFile = if path.is_file() { read_json(&path)? } else { GenerationConfigFile::default() };
        let eos_token_ids = match file.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![config.eos_token_id],
        };
        Ok(Self {
            bos_token_id: file.bos_token_id.unwrap_or(config.bos_token_id),
            eos_token_ids,
            pad_token_id: file.pad_token_id.or(config.pad_token_id),
            max_new_tokens,
        })
    }

    fn pad(&self) -> i64 {
        self.pad_token_id.or(self.eos_token_ids.first().copied()).unwrap_or(0)
    }
}

/// `attention_mask.cumsum(-1) - 1`, 1 where the mask is 0: `[B, T]`.
fn positions_from_mask(mask: &Tensor) -> Result<Tensor> {
    let pos = mask.f_cumsum(-1, Kind::Int64)?.f_sub_scalar(1)?;
    Ok(pos.f_masked_fill(&mask.f_eq(0)?, 1)?)
}

/// Greedy decoding with a fresh cache sized for the prompt and every new token. Returns `[B, 1 + n]` ids.
pub fn greedy(lm: &LlamaForCausalLM, inputs: &Spliced, policy: MaskPolicy, config: &GenerationConfig) -> Result<Tensor> {
    let s = inputs.inputs_embeds.size();
    let mut cache = lm.model.new_cache(s[0], s[1] + config.max_new_tokens as i64)?;
    greedy_with_cache(lm, inputs, policy, config, &mut cache, |_| true)
}

/// Chooses each row's next token from the last position's fp32 logits `[B, vocab]`.
pub trait NextToken {
    fn next_tokens(&self, scores: &Tensor) -> Result<Vec<i64>>;
}

/// `argmax(scores, -1)`: the first index wins ties.
#[derive(Debug, Clone, Copy, Default)]
pub struct Greedy;

impl NextToken for Greedy {
    fn next_tokens(&self, scores: &Tensor) -> Result<Vec<i64>> {
        Ok(Vec::<i64>::try_from(scores.f_argmax(-1, false)?.f_to_device(tch::Device::Cpu)?)?)
    }
}

/// Greedy decoding into the caller's (empty) cache; see [`generate`].
pub fn greedy_with_cache(
    lm: &LlamaForCausalLM,
    inputs: &Spliced,
    policy: MaskPolicy,
    config: &GenerationConfig,
    cache: &mut KvCache,
    on_token: impl FnMut(&[i64]) -> bool,
) -> Result<Tensor> {
    generate(lm, inputs, policy, config, &Greedy, cache, on_token)
}

/// The decoding loop into the caller's (empty) cache, `chooser` picking each step's tokens; `on_token`
/// sees each step's new ids, one per row, and stops the loop by returning false. Returns `[B, 1 + n]`.
pub fn generate(
    lm: &LlamaForCausalLM,
    inputs: &Spliced,
    policy: MaskPolicy,
    config: &GenerationConfig,
    chooser: &impl NextToken,
    cache: &mut KvCache,
    mut on_token: impl FnMut(&[i64]) -> bool,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    if !cache.is_empty() {
        return Err(Error::InvalidInput("greedy decoding needs an empty KV cache".into()));
    }
    let s = inputs.inputs_embeds.size();
    let (b, l) = (s[0], s[1]);
    let device = inputs.inputs_embeds.device();
    let mut mask = inputs.attention_mask.f_to_kind(Kind::Int64)?.f_to_device(device)?;
    let mut ids: Vec<Vec<i64>> = vec![vec![config.bos_token_id]; b as usize];
    let mut unfinished = vec![true; b as usize];
    let pad = config.pad();

    // First step: every prompt position.
    let visual = prefill_visual_mask(policy, &inputs.image_spans, l, device)?;
    let positions = positions_from_mask(&mask)?;
    let step = StepInputs { position_ids: &positions, attention_mask: Some(&mask), visual: &visual };
    let mut logits = lm.forward(&inputs.inputs_embeds, &step, Some(cache), false)?.logits;
    let decode_visual = Tensor::f_zeros([b, 1], (Kind::Bool, device))?;
    for _ in 0..config.max_new_tokens {
        let next = chooser.next_tokens(&logits.f_select(1, -1)?)?;
        if next.len() != b as usize {
            return Err(Error::InvalidInput(format!("{} tokens chosen for a batch of {b}", next.len())));
        }
        let next: Vec<i64> = next.iter().zip(&unfinished).map(|(&t, &u)| if u { t } else { pad }).collect();
        for (row, &t) in ids.iter_mut().zip(&next) {
            row.push(t);
        }
        for (u, t) in unfinished.iter_mut().zip(&next) {
            *u = *u && !config.eos_token_ids.contains(t);
        }
        let go_on = on_token(&next);
        if !go_on || !unfinished.iter().any(|&u| u) || ids[0].len() > config.max_new_tokens {
            break;
        }
        // One token per step: its embedding, the mask grown by one column, the next position.
        mask = Tensor::f_cat(&[&mask, &Tensor::f_ones([b, 1], (Kind::Int64, device))?], 1)?;
        let positions = positions_from_mask(&mask)?.f_narrow(1, mask.size()[1] - 1, 1)?;
        let token = Tensor::f_from_slice(&next)?.f_view([b, 1])?.f_to_device(device)?;
        let embeds = lm.model.embed(&token)?;
        let step = StepInputs { position_ids: &positions, attention_mask: Some(&mask), visual: &decode_visual };
        logits = lm.forward(&embeds, &step, Some(cache), false)?.logits;
    }
    let n = ids[0].len() as i64;
    Ok(Tensor::f_from_slice(&ids.concat())?.f_view([b, n])?)
}

/// Greedy decoding without a cache: every step re-runs the whole sequence (prompt embeddings followed by
/// the generated tokens' embeddings, the new tokens language). A check of the cached path; slow.
pub fn greedy_uncached(lm: &LlamaForCausalLM, inputs: &Spliced, policy: MaskPolicy, config: &GenerationConfig) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let s = inputs.inputs_embeds.size();
    let (b, l) = (s[0], s[1]);
    let device = inputs.inputs_embeds.device();
    let prompt_visual = prefill_visual_mask(policy, &inputs.image_spans, l, device)?;
    let mut embeds = inputs.inputs_embeds.shallow_clone();
    let mut mask = inputs.attention_mask.f_to_kind(Kind::Int64)?.f_to_device(device)?;
    let mut ids: Vec<Vec<i64>> = vec![vec![config.bos_token_id]; b as usize];
    let mut unfinished = vec![true; b as usize];
    for _ in 0..config.max_new_tokens {
        let t = embeds.size()[1];
        let visual = Tensor::f_cat(&[&prompt_visual, &Tensor::f_zeros([b, t - l], (Kind::Bool, device))?], 1)?;
        let positions = positions_from_mask(&mask)?;
        let step = StepInputs { position_ids: &positions, attention_mask: Some(&mask), visual: &visual };
        let logits = lm.forward(&embeds, &step, None, false)?.logits;
        let next = Greedy.next_tokens(&logits.f_select(1, -1)?)?;
        let next: Vec<i64> = next.iter().zip(&unfinished).map(|(&t, &u)| if u { t } else { config.pad() }).collect();
        for ((row, &t), u) in ids.iter_mut().zip(&next).zip(unfinished.iter_mut()) {
            row.push(t);
            *u = *u && !config.eos_token_ids.contains(&t);
        }
        if !unfinished.iter().any(|&u| u) {
            break;
        }
        let token = Tensor::f_from_slice(&next)?.f_view([b, 1])?.f_to_device(device)?;
        embeds = Tensor::f_cat(&[&embeds, &lm.model.embed(&token)?], 1)?;
        mask = Tensor::f_cat(&[&mask, &Tensor::f_ones([b, 1], (Kind::Int64, device))?], 1)?;
    }
    let n = ids[0].len() as i64;
    Ok(Tensor::f_from_slice(&ids.concat())?.f_view([b, n])?)
}
