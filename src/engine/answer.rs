//! One answer in progress, the same whether it decodes alone or in a batch: the prompt prepared for the
//! model, then each new token turned into events (ids, text that never splits a character, stop
//! strings), and the finish with its reason, usage and timings.
use super::events::{Event, Finish, FinishReason, PromptInfo, Timings, TokenLogprob, TokenLogprobs, Usage};
use super::request::{Request, RequestInput};
use super::reuse::{Filler, PositionKey};
use super::text::StopText;
use super::{token_id, Engine};
use crate::error::{Error, Result};
use crate::generate::{DecodeEnd, Flow, Picked, Picker, Prefilled, StepLogprobs};
use crate::llm::KvCache;
use crate::mm::splice::Spliced;
use crate::mm::visual_span::prefill_visual_mask;
use crate::model::ArcanaModel;
use crate::prompt::image_tokens::{tokenizer_image_token, IMAGE_TOKEN_INDEX};
use crate::tokenizer::{StreamDecoder, TokenSurface, Tokenizer};
use std::time::Instant;
use tch::Tensor;

/// A request made ready for the model: its prompt spliced with its images, checked against the context.
struct Prepared {
    pub info: PromptInfo,
    pub inputs: Spliced,
    pub picker: Picker,
    /// Prompt positions, image features included.
    pub positions: i64,
    /// What fills each prompt position, when the reuse cache is on and the prompt was not cut.
    pub reuse_key: Option<Vec<PositionKey>>,
    /// New tokens allowed: the request's, cut to what the context leaves.
    pub max_new_tokens: usize,
}

/// A request whose answer has started (its `Started` event sent): over already (cancelled at once, or
/// no new token asked for), or ready to decode.
// One value per request, made once and moved once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Begun<'t> {
    Over(Answer<'t>),
    Decode(Decoding<'t>),
}

/// What decoding an answer needs: its prompt, token picker and limit, and a cache sized for the
/// prompt and every new token.
pub(super) struct Decoding<'t> {
    pub answer: Answer<'t>,
    pub inputs: Spliced,
    pub picker: Picker,
    pub max_new_tokens: usize,
    /// Empty, or holding the prompt's leading positions taken from the reuse cache.
    pub cache: KvCache,
    pub reuse_key: Option<Vec<PositionKey>>,
}

impl Engine {
    /// Starts the answer to `request`, alone or in a batch: prepares the prompt, emits `Started`,
    /// seeds the generator when the request has a seed, and makes its cache.
    pub(super) fn begin(
        &self,
        request: &Request,
        started: Instant,
        emit: &mut dyn FnMut(Event) -> Flow,
    ) -> Result<Begun<'_>> {
        let Prepared { info, inputs, picker, positions, max_new_tokens, reuse_key } = self.prepare(request)?;
        let params = &request.params;
        let mut answer = Answer::new(self, started, &params.stop, positions as usize);
        answer.start(info, emit);
        if answer.is_cancelled() || max_new_tokens == 0 {
            return Ok(Begun::Over(answer));
        }
        if let Some(seed) = params.seed {
            tch::manual_seed(seed as i64);
        }
        let capacity = positions + max_new_tokens as i64;
        let reused = match &reuse_key {
            Some(key) => self.reuse.borrow_mut().lookup(key, capacity)?,
            None => None,
        };
        let cache = match reused {
            Some(cache) => cache,
            None => self.model.new_cache(1, capacity)?,
        };
        answer.cached_tokens = cache.len() as usize;
        Ok(Begun::Decode(Decoding { answer, inputs, picker, max_new_tokens, cache, reuse_key }))
    }

    /// The next part of the prompt's first step: a chunk with a chunk size, else every position left
    /// (the release's one forward when nothing was reused). Once the last position is computed, the
    /// prompt's positions are kept for later prompts (when the reuse cache is on) and the first step's
    /// result is returned.
    pub(super) fn prefill_next(&self, decoding: &mut Decoding) -> Result<Option<Prefilled>> {
        let Decoding { inputs, cache, reuse_key, .. } = decoding;
        let done = if cache.is_empty() && self.prefill_chunk.is_none() {
            Some(self.model.first_step(inputs, self.mask_policy, cache)?)
        } else {
            self.model.prefill_next(inputs, self.mask_policy, cache, self.prefill_chunk)?
        };
        if let Some(key) = done.as_ref().and_then(|_| reuse_key.take()) {
            // Not keeping it costs a later request time, not this one its answer.
            if let Err(e) = self.reuse.borrow_mut().remember(key, cache) {
                tracing::warn!(error = %e, "a prompt's KV cache could not be kept for reuse");
            }
        }
        Ok(done)
    }

    /// The spliced prompt, its images' features taken from the reuse cache where they are there, and
    /// what fills each position (the key to reusing its KV cache), when the cache is on.
    fn splice(&self, input_ids: &[i64], pixels: Option<&Tensor>) -> Result<(Spliced, Option<Vec<PositionKey>>)> {
        let ids = Tensor::f_from_slice(input_ids)?.f_view([1, -1])?;
        let mut reuse = self.reuse.borrow_mut();
        if !reuse.is_enabled() {
            return Ok((self.model.prepare_inputs(&ids, None, pixels)?, None));
        }
        let (features, set) = match pixels {
            Some(p) => {
                let (features, set) = reuse.image_features(p, || self.model.image_features(p))?;
                (Some(features), Some(set))
            }
            None => (None, None),
        };
        let inputs = self.model.splice(&ids, None, features.as_ref())?;
        let key = self.position_keys(input_ids, set, &inputs)?;
        Ok((inputs, key))
    }

    /// What fills each position of a one-row prompt, and whether it takes the visual branch; `None`
    /// when the splice cut the prompt (its positions then do not follow the ids).
    fn position_keys(&self, input_ids: &[i64], set: Option<u64>, inputs: &Spliced) -> Result<Option<Vec<PositionKey>>> {
        let len = inputs.inputs_embeds.size()[1];
        let per_image = self.model.vision.tower.tokens_per_image();
        let mut fillers = Vec::with_capacity(len as usize);
        let mut image = 0;
        for &id in input_ids {
            match (id == IMAGE_TOKEN_INDEX, set) {
                (true, Some(set)) => {
                    fillers.extend((0..per_image).map(|feature| Filler::Image { set, image, feature }));
                    image += 1;
                }
                (true, None) => return Ok(None),
                (false, _) => fillers.push(Filler::Token(id)),
            }
        }
        if fillers.len() as i64 != len {
            return Ok(None);
        }
        let visual = prefill_visual_mask(self.mask_policy, &inputs.image_spans, len, inputs.inputs_embeds.device())?;
        let visual = Vec::<bool>::try_from(visual.f_flatten(0, -1)?)?;
        Ok(Some(fillers.into_iter().zip(visual).map(|(filled_by, visual)| PositionKey { filled_by, visual }).collect()))
    }

    fn prepare(&self, request: &Request) -> Result<Prepared> {
        let params = &request.params;
        let chooser = self.generation_config().chooser(params.temperature, params.top_k, params.top_p)?;
        // A constraint that cannot compile is refused before the prompt is read.
        let matcher = match &params.constraint {
            Some(constraint) => Some(self.constraint_compiler()?.compile(constraint)?),
            None => None,
        };
        let picker = Picker::new(chooser, params.logprobs, matcher);
        let prompt = match &request.input {
            RequestInput::Conversation(messages) => self.render(messages)?,
            RequestInput::Prompt(prompt) => prompt.clone(),
        };
        let input_ids = tokenizer_image_token(&prompt, &self.tokenizer)?;
        // Everything that can refuse the request from its ids is checked before any image is decoded.
        let placeholders = input_ids.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count();
        if placeholders != request.images.len() {
            return Err(Error::InvalidInput(format!(
                "the prompt has {placeholders} image placeholder(s) but {} image(s) were given",
                request.images.len()
            )));
        }
        let positions = self.model.prompt_positions(&input_ids);
        let context = self.model.context_length();
        if positions >= context {
            return Err(Error::ContextFull { positions, context });
        }
        let pixels = self.pixel_values(&request.images)?;
        let (inputs, reuse_key) = self.splice(&input_ids, pixels.as_ref())?;
        debug_assert_eq!(positions, inputs.inputs_embeds.size()[1], "prompt positions counted before the splice");
        let max_new_tokens = params.max_new_tokens.min((context - positions) as usize);
        let info = PromptInfo { prompt, input_ids, mask_policies_differ: ArcanaModel::mask_policies_differ(&inputs) };
        Ok(Prepared { info, inputs, picker, positions, max_new_tokens, reuse_key })
    }
}

/// Events of one answer as its tokens come.
pub(super) struct Answer<'t> {
    tokenizer: &'t Tokenizer,
    started: Instant,
    /// When the prompt's embeddings were ready (images encoded and spliced in).
    encoded_at: Instant,
    first_token_at: Option<Instant>,
    stream: StreamDecoder<'t>,
    text: StopText,
    prompt_tokens: usize,
    /// Prompt positions the reuse cache gave.
    cached_tokens: usize,
    generated: usize,
    cancelled: bool,
    stopped_by_text: bool,
    error: Option<Error>,
}

impl<'t> Answer<'t> {
    pub fn new(engine: &'t Engine, started: Instant, stop: &[String], prompt_tokens: usize) -> Self {
        Self {
            tokenizer: &engine.tokenizer,
            started,
            encoded_at: Instant::now(),
            first_token_at: None,
            stream: engine.tokenizer.stream(),
            text: StopText::new(stop),
            prompt_tokens,
            cached_tokens: 0,
            generated: 0,
            cancelled: false,
            stopped_by_text: false,
            error: None,
        }
    }

    /// Emits `Started`; the caller may cancel at once.
    pub fn start(&mut self, info: PromptInfo, emit: &mut dyn FnMut(Event) -> Flow) {
        self.cancelled |= emit(Event::Started(info)) == Flow::Stop;
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// A new token: its id, its log-probabilities when asked for, and any text it completes. `Stop`
    /// once the caller cancelled, a stop string was met or the text could not be decoded (reported by
    /// `finish`).
    pub fn push(&mut self, picked: &Picked, emit: &mut dyn FnMut(Event) -> Flow) -> Flow {
        let id = picked.id;
        self.first_token_at.get_or_insert_with(Instant::now);
        self.generated += 1;
        self.cancelled |= emit(Event::Token(id)) == Flow::Stop;
        if let Some(logprobs) = &picked.logprobs {
            match self.token_logprobs(logprobs) {
                Ok(logprobs) => self.cancelled |= emit(Event::Logprobs(logprobs)) == Flow::Stop,
                Err(e) => self.error = Some(e),
            }
        }
        let piece = token_id(id).and_then(|id| self.stream.push(id));
        match piece {
            Ok(piece) => {
                let (released, stop) = self.text.push(&piece);
                self.stopped_by_text |= stop;
                if !released.is_empty() {
                    self.cancelled |= emit(Event::Text(released)) == Flow::Stop;
                }
            }
            Err(e) => self.error = Some(e),
        }
        if self.cancelled || self.stopped_by_text || self.error.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// Flushes the held text and emits `Finished`; `end` is how decoding ended (none if it never ran).
    pub fn finish(mut self, end: Option<DecodeEnd>, emit: &mut dyn FnMut(Event) -> Flow) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.stopped_by_text {
            let (released, stop) = self.text.push(&self.stream.finish());
            self.stopped_by_text = stop;
            if !released.is_empty() {
                emit(Event::Text(released));
            }
        }
        let rest = self.text.finish();
        if !rest.is_empty() {
            emit(Event::Text(rest));
        }
        let end_at = Instant::now();
        let reason = match end {
            _ if self.stopped_by_text => FinishReason::Stop,
            _ if self.cancelled => FinishReason::Cancelled,
            Some(DecodeEnd::Eos) => FinishReason::Eos,
            Some(DecodeEnd::Length) | None => FinishReason::Length,
            Some(DecodeEnd::Stopped) => FinishReason::Cancelled,
            Some(DecodeEnd::Complete) => FinishReason::Complete,
            Some(DecodeEnd::NoAllowedToken) => FinishReason::NoAllowedToken,
        };
        let first = self.first_token_at.unwrap_or(end_at);
        let finish = Finish {
            reason,
            usage: Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.generated,
                cached_tokens: self.cached_tokens,
            },
            timings: Timings {
                encode_seconds: self.encoded_at.saturating_duration_since(self.started).as_secs_f64(),
                prefill_seconds: (first - self.started).as_secs_f64(),
                decode_seconds: (end_at - first).as_secs_f64(),
            },
        };
        emit(Event::Finished(finish));
        Ok(())
    }

    fn token_logprobs(&self, step: &StepLogprobs) -> Result<TokenLogprobs> {
        let entry = |id: i64, logprob: f32| -> Result<TokenLogprob> {
            let bytes = match self.tokenizer.token_surface(token_id(id)?)? {
                TokenSurface::Bytes(bytes) => bytes,
                TokenSurface::Special(text) => text.into_bytes(),
            };
            Ok(TokenLogprob { id, token: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob })
        };
        Ok(TokenLogprobs {
            chosen: entry(step.id, step.logprob)?,
            top: step.top.iter().map(|&(id, logprob)| entry(id, logprob)).collect::<Result<_>>()?,
        })
    }
}
