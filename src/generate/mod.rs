//! The one decoding loop, as transformers 4.37.2 `generate(inputs_embeds=...)` runs it for the release:
//! ids start as `[[bos]]` (the prompt is given as embeddings only), the first step runs every prompt
//! position (positions from the padding mask: `cumsum - 1`, padded positions 1), then one token per
//! step; the [`TokenChooser`] picks from the last position's fp32 logits; finished rows are filled with
//! the pad id; it stops when every row met EOS, after `max_new_tokens`, or when the caller says so.
//!
//! With a KV cache each step runs only the new token; without one each step re-runs the whole sequence
//! (a slow check of the cached path). Both go through the same step code.
mod chooser;
mod config;
pub mod constraint;
mod picker;

pub use chooser::TokenChooser;
pub use config::GenerationConfig;
pub use picker::{step_logprobs, Picked, Picker, StepLogprobs};

use crate::error::{Error, Result};
use crate::llm::{KvCache, LlamaForCausalLM, StepInputs};
use crate::mm::splice::Spliced;
use crate::mm::visual_span::{prefill_visual_mask, MaskPolicy};
use tch::{Kind, Tensor};

/// Whether decoding goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Where the keys and values of past positions live between steps.
pub enum Stepping<'c> {
    /// Each step after the first runs only the new token against the cache, which must start empty.
    Cached(&'c mut KvCache),
    /// Each step re-runs the prompt and every token so far.
    Uncached,
}

/// What one decoding needs besides the model and its inputs.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions<'a> {
    pub generation: &'a GenerationConfig,
    pub chooser: TokenChooser,
    pub policy: MaskPolicy,
    pub max_new_tokens: usize,
}

/// Why decoding ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeEnd {
    /// Every row met an EOS id.
    Eos,
    /// `max_new_tokens` were generated.
    Length,
    /// The caller's step callback returned [`Flow::Stop`].
    Stopped,
    /// The answer's constraint was complete (engine answers only).
    Complete,
    /// The answer's constraint allowed no token (engine answers only).
    NoAllowedToken,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// One row per prompt, as transformers returns them: the BOS it starts from, then the new tokens.
    pub ids: Vec<Vec<i64>>,
    pub end: DecodeEnd,
}

impl Decoded {
    /// The ids as a `[batch, 1 + n]` tensor.
    pub fn ids_tensor(&self) -> Result<Tensor> {
        let width = self.ids.first().map_or(0, Vec::len) as i64;
        Ok(Tensor::f_from_slice(&self.ids.concat())?.f_view([self.ids.len() as i64, width])?)
    }
}

/// `attention_mask.cumsum(-1) - 1`, 1 where the mask is 0: `[B, T]`.
fn positions_from_mask(mask: &Tensor) -> Result<Tensor> {
    let pos = mask.f_cumsum(-1, Kind::Int64)?.f_sub_scalar(1)?;
    Ok(pos.f_masked_fill(&mask.f_eq(0)?, 1)?)
}

/// A prompt after its first step: the last position's logits `[B, vocab]`, and the padding mask
/// (int64, on the inputs' device) and visual mask of its positions, which the later steps extend.
pub struct Prefilled {
    pub logits: Tensor,
    pub mask: Tensor,
    pub visual: Tensor,
}

/// The first step: every prompt position of `inputs`, positions from its padding mask, the visual
/// mask of `policy`; fills `cache` when given.
pub fn prefill(
    lm: &LlamaForCausalLM,
    inputs: &Spliced,
    policy: MaskPolicy,
    cache: Option<&mut KvCache>,
) -> Result<Prefilled> {
    let s = inputs.inputs_embeds.size();
    let device = inputs.inputs_embeds.device();
    let visual = prefill_visual_mask(policy, &inputs.image_spans, s[1], device)?;
    let mask = inputs.attention_mask.f_to_kind(Kind::Int64)?.f_to_device(device)?;
    let step = StepInputs { position_ids: &positions_from_mask(&mask)?, attention_mask: Some(&mask), visual: &visual };
    let logits = lm.next_token_logits(&inputs.inputs_embeds, &step, cache)?;
    Ok(Prefilled { logits, mask, visual })
}

/// The next part of one row's first step, from position `cache.len()` (0, or positions cached from an
/// earlier prompt that starts the same way): up to the next multiple of `chunk`, or every position left
/// without a chunk size. Returns the first step's result once the last position is computed. Every
/// position gets the position id, padding mask and visual mask the whole prompt's [`prefill`] gives it.
/// Chunks end at multiples of `chunk` counted from position 0, so a prompt continued from such a
/// multiple runs exactly the forwards the whole prompt runs, and gets the same bits.
pub fn prefill_next(
    lm: &LlamaForCausalLM,
    inputs: &Spliced,
    policy: MaskPolicy,
    cache: &mut KvCache,
    chunk: Option<i64>,
) -> Result<Option<Prefilled>> {
    let s = inputs.inputs_embeds.size();
    let (start, len) = (cache.len(), s[1]);
    if s[0] != 1 || cache.batch() != 1 || start >= len || chunk.is_some_and(|c| c < 1) {
        return Err(Error::InvalidInput(format!(
            "a prefill in parts needs one row with positions left and chunks of at least 1: inputs {s:?}, \
             {start} cached, chunk {chunk:?}"
        )));
    }
    let device = inputs.inputs_embeds.device();
    let visual = prefill_visual_mask(policy, &inputs.image_spans, len, device)?;
    let mask = inputs.attention_mask.f_to_kind(Kind::Int64)?.f_to_device(device)?;
    let positions = positions_from_mask(&mask)?;
    let end = chunk.map_or(len, |c| ((start / c + 1) * c).min(len));
    let span = |t: &Tensor| t.f_narrow(1, start, end - start);
    let seen = mask.f_narrow(1, 0, end)?;
    let step = StepInputs { position_ids: &span(&positions)?, attention_mask: Some(&seen), visual: &span(&visual)? };
    let embeds = span(&inputs.inputs_embeds)?;
    if end < len {
        lm.model.forward(&embeds, &step, Some(cache), false)?;
        return Ok(None);
    }
    let logits = lm.next_token_logits(&embeds, &step, Some(cache))?;
    Ok(Some(Prefilled { logits, mask, visual }))
}

/// A cached step of one new token per row (`tokens`); `mask` `[B, past + 1]` already holds the new
/// tokens' column, `visual` is all false `[B, 1]`. Returns the logits `[B, vocab]`.
pub fn token_step(
    lm: &LlamaForCausalLM,
    tokens: &[i64],
    mask: &Tensor,
    visual: &Tensor,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let device = mask.device();
    let token = Tensor::f_from_slice(tokens)?.f_view([tokens.len() as i64, 1])?.f_to_device(device)?;
    let token_embeds = lm.model.embed(&token)?;
    let positions = positions_from_mask(mask)?;
    let last = positions.f_narrow(1, mask.size()[1] - 1, 1)?;
    let step = StepInputs { position_ids: &last, attention_mask: Some(mask), visual };
    lm.next_token_logits(&token_embeds, &step, Some(cache))
}

/// Decodes from `inputs`; `on_step` sees each step's new ids (one per row) and can stop the loop.
pub fn decode(
    lm: &LlamaForCausalLM,
    inputs: &Spliced,
    options: &DecodeOptions,
    mut stepping: Stepping,
    mut on_step: impl FnMut(&[i64]) -> Flow,
) -> Result<Decoded> {
    let _guard = tch::no_grad_guard();
    if matches!(&stepping, Stepping::Cached(cache) if !cache.is_empty()) {
        return Err(Error::InvalidInput("decoding needs an empty KV cache".into()));
    }
    let s = inputs.inputs_embeds.size();
    let (batch, prompt_len) = (s[0], s[1]);
    let device = inputs.inputs_embeds.device();
    let pad = options.generation.pad();
    let mut ids: Vec<Vec<i64>> = vec![vec![options.generation.bos_token_id]; batch as usize];
    let mut unfinished = vec![true; batch as usize];

    let cache = match &mut stepping {
        Stepping::Cached(cache) => Some(&mut **cache),
        Stepping::Uncached => None,
    };
    let Prefilled { mut logits, mut mask, visual: prompt_visual } = prefill(lm, inputs, options.policy, cache)?;
    // Uncached steps re-run this whole sequence.
    let mut sequence = inputs.inputs_embeds.shallow_clone();
    // Generated tokens are language: the release's one-token forward marks nothing visual.
    let token_visual = Tensor::f_zeros([batch, 1], (Kind::Bool, device))?;
    let mut end = DecodeEnd::Length;
    for step in 0..options.max_new_tokens {
        let next = options.chooser.choose(&logits)?;
        if next.len() != batch as usize {
            return Err(Error::InvalidInput(format!("{} tokens chosen for a batch of {batch}", next.len())));
        }
        let next: Vec<i64> = next.iter().zip(&unfinished).map(|(&t, &u)| if u { t } else { pad }).collect();
        for ((row, &t), u) in ids.iter_mut().zip(&next).zip(unfinished.iter_mut()) {
            row.push(t);
            *u = *u && !options.generation.eos_token_ids.contains(&t);
        }
        let flow = on_step(&next);
        if !unfinished.iter().any(|&u| u) {
            end = DecodeEnd::Eos;
            break;
        }
        if flow == Flow::Stop {
            end = DecodeEnd::Stopped;
            break;
        }
        if step + 1 == options.max_new_tokens {
            break;
        }
        // The new token: its embedding, the mask grown by one column, the next position.
        mask = Tensor::f_cat(&[&mask, &Tensor::f_ones([batch, 1], (Kind::Int64, device))?], 1)?;
        logits = match &mut stepping {
            Stepping::Cached(cache) => token_step(lm, &next, &mask, &token_visual, cache)?,
            Stepping::Uncached => {
                let token = Tensor::f_from_slice(&next)?.f_view([batch, 1])?.f_to_device(device)?;
                let token_embeds = lm.model.embed(&token)?;
                let positions = positions_from_mask(&mask)?;
                sequence = Tensor::f_cat(&[&sequence, &token_embeds], 1)?;
                let generated = sequence.size()[1] - prompt_len;
                let visual =
                    Tensor::f_cat(&[&prompt_visual, &Tensor::f_zeros([batch, generated], (Kind::Bool, device))?], 1)?;
                let step = StepInputs { position_ids: &positions, attention_mask: Some(&mask), visual: &visual };
                lm.next_token_logits(&sequence, &step, None)?
            }
        };
    }
    Ok(Decoded { ids, end })
}
