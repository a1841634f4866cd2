//! What the engine reports while it answers a request, and the whole answer gathered from it.
use crate::error::{Error, Result};

/// One step of an answer, in this order: `Started`, then `Token` (followed by its `Logprobs` when they
/// were asked for) and `Text` as they come (a token may add no text, or release text held back by
/// earlier ones), then `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started(PromptInfo),
    /// A generated id (EOS included).
    Token(i64),
    /// Text that is now final: never a part of a UTF-8 character, and never a part of a stop string.
    Text(String),
    /// The log-probabilities of the token just generated.
    Logprobs(TokenLogprobs),
    Finished(Finish),
}

/// A token with its log-probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub id: i64,
    /// Its text on its own (bytes that are not UTF-8 alone show as U+FFFD; `bytes` has them).
    pub token: String,
    pub bytes: Vec<u8>,
    /// `log_softmax` of the scores it was chosen from (after the constraint's mask and the temperature).
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely tokens at its step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprobs {
    pub chosen: TokenLogprob,
    /// Most likely first.
    pub top: Vec<TokenLogprob>,
}

/// The prompt as the model reads it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PromptInfo {
    /// The whole templated prompt.
    pub prompt: String,
    /// Its ids, -200 where an image goes.
    pub input_ids: Vec<i64>,
    /// Whether the release's fixed visual-LoRA span and the image's real positions differ here.
    pub mask_policies_differ: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an EOS id.
    Eos,
    /// `max_new_tokens` (or the end of the context) was reached.
    Length,
    /// The text met a stop string.
    Stop,
    /// The caller cancelled it.
    Cancelled,
    /// The answer's constraint was complete: nothing could follow.
    Complete,
    /// The answer's constraint allowed no token (a grammar that cannot go on).
    NoAllowedToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Positions of the prompt, image features included.
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt positions taken from the reuse cache instead of computed.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Timings {
    /// From the start of the request to the prompt's embeddings: tokenizing, image preprocessing, the
    /// vision tower and projector (or the reuse cache), the splice. Part of `prefill_seconds`.
    pub encode_seconds: f64,
    /// From the start of the request (images, splice, prefill) to the first token.
    pub prefill_seconds: f64,
    /// From the first token to the end.
    pub decode_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Finish {
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Completion {
    pub prompt: PromptInfo,
    /// The generated ids (without the BOS transformers puts in front).
    pub output_ids: Vec<i64>,
    pub text: String,
    /// One per output id when log-probabilities were asked for, else empty.
    pub logprobs: Vec<TokenLogprobs>,
    pub finish: Finish,
}

/// Gathers a [`Completion`] from the events of one answer.
#[derive(Debug, Default)]
pub struct CompletionBuilder {
    prompt: Option<PromptInfo>,
    output_ids: Vec<i64>,
    text: String,
    logprobs: Vec<TokenLogprobs>,
    finish: Option<Finish>,
}

impl CompletionBuilder {
    pub fn push(&mut self, event: &Event) {
        match event {
            Event::Started(prompt) => self.prompt = Some(prompt.clone()),
            Event::Token(id) => self.output_ids.push(*id),
            Event::Text(text) => self.text.push_str(text),
            Event::Logprobs(logprobs) => self.logprobs.push(logprobs.clone()),
            Event::Finished(finish) => self.finish = Some(*finish),
        }
    }

    /// The answer, or an error when the events stopped before it finished.
    pub fn finish(self) -> Result<Completion> {
        match (self.prompt, self.finish) {
            (Some(prompt), Some(finish)) => {
                Ok(Completion { prompt, output_ids: self.output_ids, text: self.text, logprobs: self.logprobs, finish })
            }
            _ => Err(Error::Engine("the answer ended before it finished".into())),
        }
    }
}
