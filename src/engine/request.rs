//! What a caller asks the engine for.
use crate::error::Result;
use crate::generate::constraint::Constraint;
use crate::generate::GenerationConfig;
use std::path::PathBuf;
use tch::Tensor;

/// One generation: a prompt, the images its `<image>` placeholders stand for, and how to decode.
#[derive(Debug)]
pub struct Request {
    pub input: RequestInput,
    /// In placeholder order: the images of a conversation's messages, first message first.
    pub images: Vec<ImageInput>,
    pub params: GenerationParams,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RequestInput {
    /// Rendered with the engine's template; it must end with a user message.
    Conversation(Vec<ChatMessage>),
    /// A prompt already in the template's form, `<image>` where each image goes.
    Prompt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Replaces the template's system prompt.
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    pub text: String,
    /// How many of the request's images this message carries: each puts the release's image marker
    /// (`<image>\n`, or `<im_start><image><im_end>\n` when the config sets `mm_use_im_start_end`) in
    /// front of the text, as the release's CLI does for the first message.
    pub images: usize,
}

impl ChatMessage {
    pub fn user(text: impl Into<String>) -> Self {
        Self { role: Role::User, text: text.into(), images: 0 }
    }

    pub fn user_with_images(text: impl Into<String>, images: usize) -> Self {
        Self { role: Role::User, text: text.into(), images }
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Self { role: Role::Assistant, text: text.into(), images: 0 }
    }

    pub fn system(text: impl Into<String>) -> Self {
        Self { role: Role::System, text: text.into(), images: 0 }
    }
}

#[derive(Debug)]
pub enum ImageInput {
    /// An image file (PNG, JPEG, WebP, BMP, GIF, TIFF), preprocessed by the engine.
    File(PathBuf),
    /// An encoded image file held in memory (e.g. from a base64 request body); `name` labels errors.
    Encoded { name: String, bytes: Vec<u8> },
    /// Pixels already preprocessed for this model: `[3, S, S]` float32 (see `Engine::preprocess_image`).
    Pixels(Tensor),
}

/// How to decode. The defaults are greedy with 512 new tokens at most.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// 0 is greedy; above 0 samples.
    pub temperature: f64,
    /// Default: the model's `generation_config.json`, else 1.0 (off).
    pub top_p: Option<f64>,
    /// Default: the model's `generation_config.json`, else 50; 0 turns it off.
    pub top_k: Option<i64>,
    /// Capped to what the model's context leaves after the prompt.
    pub max_new_tokens: usize,
    /// Generation ends when the text contains one of them; the text ends before it.
    pub stop: Vec<String>,
    /// Seeds libtorch's generator before decoding, as `torch.manual_seed` does.
    pub seed: Option<u64>,
    /// Report each token's log-probability with this many most likely alternatives (0: the token's
    /// own only); none when not asked for.
    pub logprobs: Option<usize>,
    /// What the answer must conform to; the answer ends where the constraint is complete.
    pub constraint: Option<Constraint>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            max_new_tokens: 512,
            stop: Vec::new(),
            seed: None,
            logprobs: None,
            constraint: None,
        }
    }
}

impl GenerationParams {
    /// Checks the sampling settings without a model (its defaults are checked when a request runs).
    pub fn check(&self) -> Result<()> {
        GenerationConfig::check_sampling(self.temperature, self.top_k, self.top_p)
    }
}
