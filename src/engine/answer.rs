//! One answer in progress, the same whether it decodes alone or in a batch: the prompt prepared for the
//! model, then each new token turned into events (ids, text that never splits a character, stop
//! strings), and the finish with its reason, usage and timings.
use super::events::{Event, Finish, FinishReason, PromptInfo, Timings, TokenLogprob, TokenLogprobs, Usage};
use super::request::{Request, RequestInput};
use super::text::StopText;
use super::{token_id, Engine};
use crate::error::{Error, Result};
use crate::generate::{DecodeEnd, Flow, Picked, Picker, StepLogprobs};
use crate::llm::KvCache;
use crate::mm::splice::Spliced;
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
    /// New tokens allowed: the request's, cut to what the context leaves.
    pub max_new_tokens: usize,
}

/// A request whose answer has started (its `Started` event sent): over already (cancelled at once, or
/// no new token asked for), or ready to decode.
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
    pub cache: KvCache,
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
        let Prepared { info, inputs, picker, positions, max_new_tokens } = self.prepare(request)?;
        let params = &request.params;
        let mut answer = Answer::new(self, started, &params.stop, positions as usize);
        answer.start(info, emit);
        if answer.is_cancelled() || max_new_tokens == 0 {
            return Ok(Begun::Over(answer));
        }
        if let Some(seed) = params.seed {
            tch::manual_seed(seed as i64);
        }
        let cache = self.model.new_cache(1, positions + max_new_tokens as i64)?;
        Ok(Begun::Decode(Decoding { answer, inputs, picker, max_new_tokens, cache }))
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
        let ids = Tensor::f_from_slice(&input_ids)?.f_view([1, -1])?;
        let pixels = self.pixel_values(&request.images)?;
        let inputs = self.model.prepare_inputs(&ids, None, pixels.as_ref())?;
        debug_assert_eq!(positions, inputs.inputs_embeds.size()[1], "prompt positions counted before the splice");
        let max_new_tokens = params.max_new_tokens.min((context - positions) as usize);
        let info = PromptInfo { prompt, input_ids, mask_policies_differ: ArcanaModel::mask_policies_differ(&inputs) };
        Ok(Prepared { info, inputs, picker, positions, max_new_tokens })
    }
}

/// Events of one answer as its tokens come.
pub(super) struct Answer<'t> {
    tokenizer: &'t Tokenizer,
    started: Instant,
    first_token_at: Option<Instant>,
    stream: StreamDecoder<'t>,
    text: StopText,
    prompt_tokens: usize,
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
            first_token_at: None,
            stream: engine.tokenizer.stream(),
            text: StopText::new(stop),
            prompt_tokens,
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
            usage: Usage { prompt_tokens: self.prompt_tokens, completion_tokens: self.generated },
            timings: Timings {
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
