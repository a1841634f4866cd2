//! A chat with the model as the release's `serve/cli.py` runs it: the template chosen from the model
//! folder's name, the image attached to the first user message, each turn's prompt turned into ids by
//! `tokenizer_image_token`, the answer generated and streamed, and the reply stored the way the release
//! stores it (`tokenizer.decode(output_ids).strip()`, special tokens included).
use crate::error::{Error, Result};
use crate::generate::{generate, GenerationConfig};
use crate::llm::mask::MaskPolicy;
use crate::mm::conversation::{strip_python_whitespace, CliChat};
use crate::mm::prompt::{tokenizer_image_token, TextEncoder};
use crate::mm::splice::prepare_inputs;
use crate::model::ArcanaModel;
use crate::sampling::Decoding;
use crate::tokenizer::Tokenizer;
use std::time::Instant;
use tch::{Kind, Tensor};

impl TextEncoder for Tokenizer {
    fn encode_with_bos(&self, text: &str) -> Result<Vec<i64>> {
        Ok(self.encode(text).into_iter().map(i64::from).collect())
    }

    fn bos_id(&self) -> i64 {
        Tokenizer::bos_id(self).map(i64::from).unwrap_or(1)
    }
}

#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// `--conv-mode`; `None` picks the template from the model folder's name.
    pub conv_mode: Option<String>,
    pub decoding: Decoding,
    pub max_new_tokens: usize,
    pub mask_policy: MaskPolicy,
}

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
    /// Whether the release's visual mask and the real image positions differ for this prompt.
    pub mask_policies_differ: bool,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// A conversation in progress over a loaded model.
pub struct ChatSession<'m> {
    model: &'m ArcanaModel,
    tokenizer: &'m Tokenizer,
    chat: CliChat,
    /// Projected features of the image, computed once: `[1, tokens, hidden]`.
    image_features: Option<Tensor>,
    options: ChatOptions,
    generation: GenerationConfig,
}

impl<'m> ChatSession<'m> {
    /// `model_path` is the path as the user gave it (its last component names the template).
    pub fn new(
        model: &'m ArcanaModel,
        tokenizer: &'m Tokenizer,
        model_path: &str,
        pixel_values: Option<&Tensor>,
        options: ChatOptions,
    ) -> Result<Self> {
        let config = &model.files.config;
        let chat = CliChat::for_model(model_path, options.conv_mode.as_deref(), pixel_values.is_some(), config.mm_use_im_start_end)?;
        let image_features = match pixel_values {
            Some(p) => {
                let p = if p.dim() == 3 { p.f_unsqueeze(0)? } else { p.shallow_clone() };
                let p = p.f_to_kind(model.llm.model.embed_tokens.kind())?.f_to_device(model.llm.model.embed_tokens.device())?;
                Some(model.vision.encode(&p)?.projected)
            }
            None => None,
        };
        let generation = GenerationConfig::from_model_dir(&model.files.dir, config, options.max_new_tokens)?;
        Ok(Self { model, tokenizer, chat, image_features, options, generation })
    }

    pub fn chat(&self) -> &CliChat {
        &self.chat
    }

    /// Runs one user turn; `on_text` receives the answer's text as it becomes final.
    pub fn turn(&mut self, user_input: &str, mut on_text: impl FnMut(&str)) -> Result<TurnResult> {
        let _guard = tch::no_grad_guard();
        let prompt = self.chat.prompt_for(user_input)?;
        match self.generate_reply(&prompt, &mut on_text) {
            Ok(result) => {
                self.chat.record_reply(&result.reply)?;
                Ok(result)
            }
            Err(e) => {
                // Leave the conversation as it was before this turn.
                self.chat.undo_last_turn();
                Err(e)
            }
        }
    }

    fn generate_reply(&self, prompt: &str, on_text: &mut impl FnMut(&str)) -> Result<TurnResult> {
        let model = self.model;
        let input_ids = tokenizer_image_token(prompt, self.tokenizer)?;
        let ids = Tensor::f_from_slice(&input_ids)?.f_view([1, -1])?;
        let start = Instant::now();
        let inputs = prepare_inputs(
            &model.llm.model,
            &ids,
            None,
            self.image_features.as_ref(),
            model.files.config.tokenizer_model_max_length,
        )?;
        let positions = inputs.inputs_embeds.size()[1];
        let context = model.files.config.max_position_embeddings;
        if positions >= context {
            return Err(Error::Prompt(format!(
                "the prompt takes {positions} positions (image features included), which leaves no room in the model's context of {context}"
            )));
        }
        let mut generation = self.generation.clone();
        generation.max_new_tokens = generation.max_new_tokens.min((context - positions) as usize);
        let differ = ArcanaModel::mask_policies_differ(&inputs);
        let mut stream = self.tokenizer.stream();
        let mut text = String::new();
        let mut first_token_at = None;
        let mut stream_error = None;
        let mut on_token = |next: &[i64]| {
            first_token_at.get_or_insert_with(Instant::now);
            match u32::try_from(next[0]).map_err(|_| Error::Tokenizer(format!("id {} out of range", next[0]))).and_then(|id| stream.push(id)) {
                Ok(piece) => {
                    on_text(&piece);
                    text.push_str(&piece);
                    true
                }
                Err(e) => {
                    stream_error = Some(e);
                    false
                }
            }
        };
        let mut cache = model.llm.model.new_cache(1, positions + generation.max_new_tokens as i64)?;
        let output = generate(&model.llm, &inputs, self.options.mask_policy, &generation, &self.options.decoding, &mut cache, &mut on_token)?;
        if let Some(e) = stream_error {
            return Err(e);
        }
        let rest = stream.finish();
        on_text(&rest);
        text.push_str(&rest);
        let end = Instant::now();
        let output_ids: Vec<i64> = Vec::<i64>::try_from(output.f_flatten(0, -1)?.f_to_kind(Kind::Int64)?)?;
        let as_u32: Vec<u32> = output_ids.iter().map(|&i| i as u32).collect();
        let reply = strip_python_whitespace(&self.tokenizer.decode_with_special_tokens(&as_u32)?).to_string();
        let first = first_token_at.unwrap_or(end);
        Ok(TurnResult {
            prompt: prompt.to_string(),
            input_ids,
            output_ids,
            text,
            reply,
            prefill_positions: positions,
            mask_policies_differ: differ,
            prefill_seconds: (first - start).as_secs_f64(),
            decode_seconds: (end - first).as_secs_f64(),
        })
    }
}
