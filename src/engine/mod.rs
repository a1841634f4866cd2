//! The inference engine: a model folder loaded once (weights, tokenizer, image processor, template,
//! generation defaults) answering [`Request`]s with a stream of [`Event`]s.
//!
//! # Threading
//!
//! libtorch tensors may move between threads but not be shared, so one thread owns the [`Engine`]. Two
//! ways to use it:
//!
//! - On the thread that loaded it: [`Engine::generate`] answers one request, calling back with each
//!   event; the callback returns [`Flow::Stop`] to cancel between tokens. The CLI does this.
//! - From many threads: [`Engine::spawn`] moves the engine onto its own thread, fed by a queue, and
//!   returns an [`EngineHandle`] (`Clone + Send`). [`EngineHandle::submit`] queues a request and returns
//!   a [`ResponseStream`] that yields its events as they come; [`CancelToken::cancel`] (or dropping the
//!   stream) stops the answer before its next token. The thread ends when every handle is dropped.
//!   `spawn` answers one request at a time, in submission order, each exactly as `generate` would;
//!   [`Engine::spawn_batched`] decodes up to N answers at once in one forward per token (see [`batch`]
//!   for what that changes in the low bits).
//!
//! Sampling draws from libtorch's default generator, which belongs to the process: a request's `seed`
//! makes its draws reproducible because the engine thread is the only one generating.
mod answer;
pub mod batch;
pub mod devices;
mod events;
mod handle;
mod request;
mod reuse;
mod stats;
mod text;

pub use crate::generate::Flow;
pub use events::{
    Completion, CompletionBuilder, Event, Finish, FinishReason, PromptInfo, Timings, TokenLogprob, TokenLogprobs, Usage,
};
pub use handle::{CancelToken, EngineHandle, ResponseStream};
pub use request::{ChatMessage, GenerationParams, ImageInput, Request, RequestInput, Role};
pub use reuse::{ReuseStats, ReuseStatsSnapshot};
pub use stats::{DecodeStats, DecodeStatsSnapshot};

use crate::error::{Error, Result};
use crate::generate::constraint::ConstraintCompiler;
use crate::generate::GenerationConfig;
use crate::llm::llama::DecoderSites;
use crate::llm::placement::{plan_balanced, Placement, Plan};
use crate::mm::visual_span::MaskPolicy;
use crate::model::{ArcanaModel, ModelFiles};
use crate::prompt::conversation::{
    cli_user_message, model_name_from_path, resolve_conv_mode, template_by_name, ConvModeChoice, Conversation,
};
use crate::quant::{BaseWeight, LinearStorage, Quantization, WeightForms};
use crate::tokenizer::Tokenizer;
use crate::vision::preprocess::{ImagePreprocessor, DEFAULT_MAX_PIXELS};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How to load a model folder.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub kind: Kind,
    pub device: Device,
    /// Spreading the model over devices; with `Placement::Single` everything is on `device`.
    pub placement: Placement,
    /// How the decoder's projections and `lm_head` are stored (int8, int4, fp16 weights).
    pub quantization: Option<Quantization>,
    /// Fold the MM-LoRA language branch into the base weights at load.
    pub merge_lora: bool,
    /// How the vision side's linear layers are stored (fp16 weights on the CPU).
    pub vision_linears: LinearStorage,
    /// libtorch's intra-op threads on the threads that load and run the engine (libtorch's default when
    /// none: OMP_NUM_THREADS, else every CPU).
    pub threads: Option<usize>,
    /// The name the template is chosen from, as the release does (`get_model_name_from_path`); by
    /// default the model folder's path. A checkpoint assembled elsewhere keeps the name the user gave.
    pub model_name_path: Option<String>,
    /// The checkpoint was assembled with a `--model-base` (the release then loads the slow tokenizer).
    pub with_model_base: bool,
    /// Template override (`--conv-mode`).
    pub conv_mode: Option<String>,
    /// Which positions take the visual LoRA branch.
    pub mask_policy: MaskPolicy,
    /// Images with more pixels are refused from their header, before decoding; with a model that pads
    /// images to squares the padded square counts. Pillow's limit by default.
    pub max_image_pixels: u64,
    /// Bytes kept from recent requests for later ones to reuse (image features, prompt KV caches; see
    /// `reuse`); 0, the default, keeps nothing.
    pub reuse_budget_bytes: usize,
    /// Prefill prompts in forwards of this many positions (chunks ending at its multiples); `None`, the
    /// default, runs a whole prompt in one forward, as the release does. With a chunk size, prompt
    /// positions are reused only up to a chunk's end, so a reusing answer equals a fresh one to the bit.
    pub prefill_chunk: Option<i64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            kind: Kind::Float,
            device: Device::Cpu,
            placement: Placement::Single,
            quantization: None,
            merge_lora: false,
            vision_linears: LinearStorage::Dense,
            threads: None,
            model_name_path: None,
            with_model_base: false,
            conv_mode: None,
            mask_policy: MaskPolicy::Release,
            max_image_pixels: DEFAULT_MAX_PIXELS,
            reuse_budget_bytes: 0,
            prefill_chunk: None,
        }
    }
}

/// Bytes of the decoder's projections and `lm_head`, dense in the compute dtype and as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedSize {
    pub mode: Quantization,
    pub before_bytes: usize,
    pub after_bytes: usize,
}

pub struct Engine {
    model: ArcanaModel,
    tokenizer: Tokenizer,
    images: ImagePreprocessor,
    model_name: String,
    conv_mode: ConvModeChoice,
    /// The chosen template, without messages.
    template: Conversation,
    mask_policy: MaskPolicy,
    quantized: Option<QuantizedSize>,
    /// Where the parts went, for a placement other than `Single`.
    plan: Option<Plan>,
    /// Intra-op threads, set again on the engine's own thread (libtorch's setting is per thread).
    threads: i32,
    /// The vocabulary for constrained decoding, built at the first constrained request.
    constraints: std::cell::OnceCell<ConstraintCompiler>,
    /// Image features and prompt KV caches kept for later requests.
    reuse: std::cell::RefCell<reuse::ReuseCache>,
    prefill_chunk: Option<i64>,
}

impl Engine {
    pub fn load(dir: &Path, options: EngineOptions) -> Result<Self> {
        Self::load_with_progress(dir, options, |_, _| {})
    }

    /// `load`, calling `progress(tensors loaded, tensors in the checkpoint files)` after each tensor.
    pub fn load_with_progress(
        dir: &Path,
        options: EngineOptions,
        progress: impl Fn(usize, usize) + 'static,
    ) -> Result<Self> {
        let name_path = options.model_name_path.clone().unwrap_or_else(|| dir.to_string_lossy().into_owned());
        let model_name = model_name_from_path(&name_path)?;
        let conv_mode = resolve_conv_mode(&model_name, options.conv_mode.as_deref());
        let template = template_by_name(&conv_mode.chosen)?;
        if let Some(threads) = options.threads {
            let threads = i32::try_from(threads)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| Error::InvalidInput(format!("threads: expected 1 to {}, got {threads}", i32::MAX)))?;
            tch::set_num_threads(threads);
        }
        let chunk = match options.prefill_chunk {
            Some(c) if c < 1 => {
                return Err(Error::InvalidInput(format!("prefill chunk: expected at least 1, got {c}")))
            }
            Some(c) => Some(c as usize),
            None => None,
        };
        let files = ModelFiles::open(dir)?;
        let plan = plan(&files, &options)?;
        let sites = match &plan {
            Some(plan) => DecoderSites::from_plan(plan, options.kind),
            None => DecoderSites::single(options.kind, options.device, files.config.num_hidden_layers as usize),
        };
        let storage = WeightForms {
            storage: options.quantization,
            merge_lora: options.merge_lora,
            vision: options.vision_linears,
            prequantized: false,
        };
        let model = ArcanaModel::load_on(files, &sites, storage, progress)?;
        let quantized = model.forms.storage.map(|mode| {
            let dense = options.kind.elt_size_in_bytes();
            let weights = || model.base_weights();
            QuantizedSize {
                mode,
                before_bytes: weights().map(|w| w.shape().iter().product::<i64>() as usize * dense).sum(),
                after_bytes: weights().map(BaseWeight::bytes).sum(),
            }
        });
        // Fast or slow as the release's builder chooses, by the model's name.
        let name_path = options.model_name_path.as_deref().map(Path::new).unwrap_or(dir);
        let tokenizer = Tokenizer::for_release(dir, name_path, options.with_model_base)?;
        let images = model.files().image_preprocessor()?.with_max_pixels(options.max_image_pixels);
        Ok(Self {
            model,
            tokenizer,
            images,
            model_name,
            conv_mode,
            template,
            mask_policy: options.mask_policy,
            quantized,
            plan,
            threads: tch::get_num_threads(),
            constraints: std::cell::OnceCell::new(),
            reuse: std::cell::RefCell::new(reuse::ReuseCache::new(options.reuse_budget_bytes, chunk)),
            prefill_chunk: options.prefill_chunk,
        })
    }

    /// Where the parts went (with notes such as layers offloaded to the CPU), unless everything is on
    /// one device by `Placement::Single`.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// libtorch's intra-op threads this engine computes with.
    pub fn threads(&self) -> usize {
        self.threads as usize
    }

    pub fn model(&self) -> &ArcanaModel {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The release's model name (from the model path), which chose the template.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn conv_mode(&self) -> &ConvModeChoice {
        &self.conv_mode
    }

    /// The template conversations are rendered with, without messages.
    pub fn template(&self) -> &Conversation {
        &self.template
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        self.model.generation_config()
    }

    /// How the weights are stored: as the options asked, or as a pre-quantized folder holds them.
    pub fn weight_forms(&self) -> WeightForms {
        self.model.forms
    }

    pub fn quantized(&self) -> Option<QuantizedSize> {
        self.quantized
    }

    /// The counters of the reuse cache (hits, misses, bytes held).
    pub fn reuse_stats(&self) -> std::sync::Arc<ReuseStats> {
        self.reuse.borrow().stats()
    }

    /// The vocabulary constraints compile against (built once, at the first use).
    pub fn constraint_compiler(&self) -> Result<&ConstraintCompiler> {
        if let Some(compiler) = self.constraints.get() {
            return Ok(compiler);
        }
        let width = self.model.files().config.vocab_size as usize;
        let eos = self.generation_config().eos_token_ids.first().copied().unwrap_or(2);
        let compiler = ConstraintCompiler::new(&self.tokenizer, width, eos)?;
        Ok(self.constraints.get_or_init(|| compiler))
    }

    /// An image file as this model's `[3, S, S]` float32 pixels.
    pub fn preprocess_image(&self, path: &Path) -> Result<Tensor> {
        self.images.image_tensor(path)
    }

    /// The template prompt of a conversation, with an open reply slot at the end.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        if messages.iter().rev().find(|m| m.role != Role::System).map(|m| m.role) != Some(Role::User) {
            return Err(Error::Prompt("a conversation must end with a user message".into()));
        }
        let mut conversation = self.template.clone();
        let [user, assistant] = conversation.roles.clone();
        let start_end = self.model.files().config.mm_use_im_start_end;
        for message in messages {
            match message.role {
                Role::System => conversation.system = message.text.clone(),
                Role::User => {
                    let text = (0..message.images)
                        .fold(message.text.clone(), |text, _| cli_user_message(&text, true, start_end));
                    conversation.append_message(&user, Some(&text));
                }
                Role::Assistant => conversation.append_message(&assistant, Some(&message.text)),
            }
        }
        conversation.append_message(&assistant, None);
        conversation.get_prompt()
    }

    /// `decode(ids)` with special tokens kept, as the release's CLI stores a reply.
    pub fn decode_with_special_tokens(&self, ids: &[i64]) -> Result<String> {
        let ids = ids.iter().map(|&id| token_id(id)).collect::<Result<Vec<u32>>>()?;
        self.tokenizer.decode_with_special_tokens(&ids)
    }

    fn pixel_values(&self, images: &[ImageInput]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        let pixels = images
            .iter()
            .map(|image| match image {
                ImageInput::File(path) => self.preprocess_image(path),
                ImageInput::Pixels(pixels) => Ok(pixels.shallow_clone()),
                ImageInput::Encoded { name, bytes } => self.images.encoded_image_tensor(bytes, name),
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(other) = pixels.iter().find(|p| p.size() != pixels[0].size()) {
            return Err(Error::InvalidInput(format!(
                "images of different sizes: {:?} and {:?}",
                pixels[0].size(),
                other.size()
            )));
        }
        Ok(Some(Tensor::f_stack(&pixels, 0)?))
    }

    /// Answers one request, calling `on_event` with each event; `on_event` returning [`Flow::Stop`]
    /// cancels the answer before its next token (the `Finished` event still comes). It runs the
    /// batched decoding loop with this one answer, which computes what the release computes.
    pub fn generate(&self, request: &Request, on_event: impl FnMut(Event) -> Flow) -> Result<Completion> {
        batch::answer_alone(self, request, on_event)
    }

    /// Moves the engine onto its own thread, fed by a queue, answering one request at a time; see the
    /// module docs.
    pub fn spawn(self) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        self.spawn_batched(1)
    }

    /// `spawn`, decoding up to `max_batch` answers at once (continuous batching; see [`batch`]).
    pub fn spawn_batched(self, max_batch: usize) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let (jobs, queue) = std::sync::mpsc::channel();
        let stats = std::sync::Arc::new(DecodeStats::default());
        let reuse_stats = self.reuse_stats();
        let thread = std::thread::Builder::new()
            .name("arcana-engine".into())
            .spawn({
                let stats = stats.clone();
                move || {
                    // libtorch's thread count is per thread: the engine's own, set where it loaded.
                    tch::set_num_threads(self.threads);
                    batch::serve(&self, queue, max_batch.max(1), &stats)
                }
            })
            .map_err(|e| Error::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok((EngineHandle::new(jobs, stats, reuse_stats), thread))
    }
}

/// The plan a placement asks for: a device map checked against the model's layers, or the balanced map
/// over the visible GPUs' budgets (sized in the compute dtype; quantization is not counted).
fn plan(files: &ModelFiles, options: &EngineOptions) -> Result<Option<Plan>> {
    let num_layers = files.config.num_hidden_layers as usize;
    match &options.placement {
        Placement::Single => Ok(None),
        Placement::Map(map) => map.plan(num_layers).map(Some),
        Placement::Auto(limits) => {
            let (budgets, notes) = devices::budgets(limits)?;
            let mut plan = plan_balanced(&files.part_sizes(options.kind)?, &budgets)?;
            plan.notes.splice(0..0, notes);
            Ok(Some(plan))
        }
    }
}

fn token_id(id: i64) -> Result<u32> {
    u32::try_from(id).map_err(|_| Error::Tokenizer(format!("id {id} out of range")))
}
