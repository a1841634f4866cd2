//! One answer's choice of its next token: the constraint's mask when it has one, then its
//! [`TokenChooser`], then the log-probabilities it asked for. Without a constraint or log-probabilities
//! this is the chooser alone, so answers stay bit-identical to the release's decoding.
use super::chooser::TokenChooser;
use super::constraint::{Matcher, Progress};
use crate::error::{Error, Result};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The log-probability of a chosen token and of the most likely tokens at its step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogprobs {
    pub id: i64,
    pub logprob: f32,
    /// The `top` most likely ids, most likely first (ties: lower id first).
    pub top: Vec<(i64, f32)>,
}

/// A chosen token and what came with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    pub id: i64,
    pub logprobs: Option<StepLogprobs>,
    /// The constraint is complete after this token: nothing may follow it.
    pub constraint_complete: bool,
    /// Time the constraint took (its mask and its advance); zero without one.
    pub constraint_time: Duration,
}

pub struct Picker {
    chooser: TokenChooser,
    /// How many alternatives to report with each token's log-probability; none when not asked for.
    top_logprobs: Option<usize>,
    /// Boxed: llguidance's matcher is large, and answers without a constraint carry none.
    constraint: Option<Box<Matcher>>,
}

impl Picker {
    pub fn new(chooser: TokenChooser, top_logprobs: Option<usize>, constraint: Option<Matcher>) -> Self {
        Self { chooser, top_logprobs, constraint: constraint.map(Box::new) }
    }

    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// The next token from one row of fp32 logits `[1, vocab]`; `None` when the constraint allows
    /// no token at all.
    pub fn pick(&mut self, logits: &Tensor) -> Result<Option<Picked>> {
        let masking = Instant::now();
        let scores = match &mut self.constraint {
            Some(matcher) => match matcher.mask(logits)? {
                Some(masked) => masked,
                None => return Ok(None),
            },
            None => logits.shallow_clone(),
        };
        let mut constraint_time = match self.constraint {
            Some(_) => masking.elapsed(),
            None => Duration::ZERO,
        };
        let id = self.chooser.choose(&scores)?[0];
        let logprobs = match self.top_logprobs {
            Some(top) => Some(step_logprobs(&self.chooser.tempered(&scores)?, id, top)?),
            None => None,
        };
        let constraint_complete = match &mut self.constraint {
            Some(matcher) => {
                let advancing = Instant::now();
                let progress = matcher.advance(id)?;
                constraint_time += advancing.elapsed();
                progress == Progress::Complete
            }
            None => false,
        };
        Ok(Some(Picked { id, logprobs, constraint_complete, constraint_time }))
    }
}

/// `log_softmax` of `scores` `[1, vocab]` at `id`, and its `top` largest entries.
pub fn step_logprobs(scores: &Tensor, id: i64, top: usize) -> Result<StepLogprobs> {
    let logprobs = scores.f_log_softmax(-1, Kind::Float)?.f_squeeze_dim(0)?.f_to_device(Device::Cpu)?;
    let vocab = logprobs.size()[0];
    if !(0..vocab).contains(&id) {
        return Err(Error::Engine(format!("token {id} outside the {vocab} scores")));
    }
    let logprob = logprobs.f_double_value(&[id])? as f32;
    let top = if top == 0 {
        Vec::new()
    } else {
        let (values, indices) = logprobs.f_topk((top as i64).min(vocab), -1, true, true)?;
        let values = Vec::<f32>::try_from(values)?;
        let indices = Vec::<i64>::try_from(indices)?;
        let mut pairs: Vec<(i64, f32)> = indices.into_iter().zip(values).collect();
        // topk's order among equal values is not specified: lower id first, as a stable sort gives.
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        pairs
    };
    Ok(StepLogprobs { id, logprob, top })
}
