//! A chat with the model as the release's `serve/cli.py` runs it, on an [`Engine`]: the image attached
//! to the first user message, each turn answered from the whole conversation, and the reply stored the
//! way the release stores it (`tokenizer.decode(output_ids).strip()`, special tokens included).
use crate::engine::{
    ChatMessage, Engine, Event, FinishReason, Flow, GenerationParams, ImageInput, Request, RequestInput, TokenLogprobs,
};
use crate::error::Result;
use crate::prompt::conversation::strip_python_whitespace;
use tch::Tensor;

/// What one turn produced, with its timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TurnResult {
    /// The whole template prompt of this turn.
    pub prompt: String,
    /// Prompt ids with -200 where the image goes.
    pub input_ids: Vec<i64>,
    /// As the release's `generate` returns them: the BOS it starts from, then the new tokens.
    pub output_ids: Vec<i64>,
    /// The streamed text (special tokens skipped).
    pub text: String,
    /// What the conversation keeps: `decode(output_ids).strip()` with special tokens.
    pub reply: String,
    /// Positions of the language model's prefill (image features included).
    pub prefill_positions: i64,
    /// Of those, positions taken from the reuse cache (`--reuse-cache-bytes`) instead of computed.
    pub reused_positions: i64,
    /// Whether the release's visual mask and the real image positions differ for this prompt.
    pub mask_policies_differ: bool,
    /// Of `prefill_seconds`, the time to the prompt's embeddings (the image through the vision tower
    /// and projector, spliced in); the rest is the language model's prefill.
    pub encode_seconds: f64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Why the answer ended.
    pub finish_reason: FinishReason,
    /// Each new token's log-probability and alternatives, when asked for (`--logprobs N`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprobs>,
}

/// A conversation in progress over an engine.
pub struct ChatSession<'e> {
    engine: &'e Engine,
    messages: Vec<ChatMessage>,
    /// Preprocessed pixels of the image shown with the first message, sent with every turn (the
    /// release's CLI passes it to every `generate`).
    image: Option<Tensor>,
    /// The seed applies to the first answer only, as the release seeds once before the chat.
    params: GenerationParams,
}

impl<'e> ChatSession<'e> {
    pub fn new(engine: &'e Engine, image: Option<Tensor>, params: GenerationParams) -> Self {
        Self { engine, messages: Vec::new(), image, params }
    }

    /// Runs one user turn; `on_text` receives the answer's text as it becomes final. A failed turn
    /// leaves the conversation as it was.
    pub fn turn(&mut self, user_input: &str, mut on_text: impl FnMut(&str)) -> Result<TurnResult> {
        let first = self.messages.is_empty();
        let images_here = usize::from(first && self.image.is_some());
        let mut messages = self.messages.clone();
        messages.push(ChatMessage::user_with_images(user_input, images_here));
        let mut params = self.params.clone();
        if !first {
            params.seed = None;
        }
        let images = self.image.iter().map(|p| ImageInput::Pixels(p.shallow_clone())).collect();
        let request = Request { input: RequestInput::Conversation(messages.clone()), images, params };
        let completion = self.engine.generate(&request, |event| {
            if let Event::Text(piece) = &event {
                on_text(piece);
            }
            Flow::Continue
        })?;
        let output_ids: Vec<i64> = std::iter::once(self.engine.generation_config().bos_token_id)
            .chain(completion.output_ids.iter().copied())
            .collect();
        let reply = strip_python_whitespace(&self.engine.decode_with_special_tokens(&output_ids)?).to_string();
        messages.push(ChatMessage::assistant(reply.clone()));
        self.messages = messages;
        let finish = completion.finish;
        Ok(TurnResult {
            prompt: completion.prompt.prompt,
            input_ids: completion.prompt.input_ids,
            output_ids,
            text: completion.text,
            reply,
            prefill_positions: finish.usage.prompt_tokens as i64,
            reused_positions: finish.usage.cached_tokens as i64,
            mask_policies_differ: completion.prompt.mask_policies_differ,
            encode_seconds: finish.timings.encode_seconds,
            prefill_seconds: finish.timings.prefill_seconds,
            decode_seconds: finish.timings.decode_seconds,
            finish_reason: finish.reason,
            logprobs: completion.logprobs,
        })
    }
}
