//! transformers' `LlamaTokenizerFast` (4.37.2): `tokenizer.json` run by the `tokenizers` crate
//! (the Rust core of the Python `tokenizers` 0.15.1 it wraps), with what the Python class sets
//! around it from the tokenizer configs: re-added tokens, the BOS/EOS template and the clean-up.
use std::path::Path;

use tokenizers::models::ModelWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer as CoreTokenizer};

use super::llama::{SpecialToken, TokenizerOptions};
use super::sentencepiece::TokenId;
use super::settings::TokenizerSettings;
use super::special::SpecialIds;
use crate::{Error, Result};

/// A token of `added_tokens_decoder` in tokenizer_config.json, with every flag `AddedToken` has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigAddedToken {
    pub content: String,
    pub lstrip: bool,
    pub rstrip: bool,
    pub single_word: bool,
    pub normalized: bool,
    pub special: bool,
}

impl ConfigAddedToken {
    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
            .normalized(self.normalized)
    }
}

/// A tokenizer that gives the ids and text of `LlamaTokenizerFast.from_pretrained(dir)`.
#[derive(Debug, Clone)]
pub struct FastTokenizer {
    core: CoreTokenizer,
    /// With added tokens; kept because the core builds its whole vocabulary map to count it.
    vocab_size: usize,
    /// Skipped by `decode(skip_special_tokens=True)`: the added tokens marked special.
    special_ids: SpecialIds,
    legacy: bool,
    clean_up_tokenization_spaces: bool,
}

fn core_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

impl FastTokenizer {
    /// Loads `path` (a tokenizer.json) and applies the options and `added_tokens_decoder` entries
    /// (in id order) of the folder's configs as `PreTrainedTokenizerFast.__init__` does.
    pub fn from_file(
        path: &Path,
        options: &TokenizerOptions,
        config_added_tokens: &[ConfigAddedToken],
    ) -> Result<Self> {
        let mut core = CoreTokenizer::from_file(path).map_err(|e| core_error(path, e))?;
        // The encode errors of a BPE model are an unknown token outside its vocabulary; ruling that
        // out here is what lets `encode` be infallible, as the slow tokenizer's is.
        let ModelWrapper::BPE(bpe) = core.get_model() else {
            return Err(core_error(path, "only BPE models (Llama, Mistral) are supported"));
        };
        if let Some(unk) = bpe.get_unk_token() {
            if core.token_to_id(unk).is_none() {
                return Err(core_error(path, format!("unk_token {unk:?} is not in the vocabulary")));
            }
        }
        let named: Vec<&SpecialToken> = options.named_special_tokens().collect();

        // transformers re-adds every configured added token (its membership test compares a token
        // with ids, so it never matches), then the named special tokens the vocabulary lacks, in
        // runs of equal `special` (a named token counts as special).
        let is_named = |content: &str| named.iter().any(|t| t.content == content);
        let mut to_add: Vec<(AddedToken, bool)> =
            config_added_tokens.iter().map(|t| (t.to_added_token(), t.special || is_named(&t.content))).collect();
        let in_file: Vec<String> = core.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
        for token in &named {
            let queued = to_add.iter().any(|(t, _)| t.content == token.content);
            if !queued && !in_file.contains(&token.content) {
                let added = AddedToken::from(token.content.clone(), true).lstrip(token.lstrip).rstrip(token.rstrip);
                to_add.push((added, true));
            }
        }
        for run in to_add.chunk_by(|a, b| a.1 == b.1) {
            // The Python binding's `add_special_tokens` marks each token special.
            let special = run[0].1;
            let tokens: Vec<AddedToken> = run.iter().map(|(t, _)| t.clone().special(special || t.special)).collect();
            if special {
                core.add_special_tokens(&tokens);
            } else {
                core.add_tokens(&tokens);
            }
        }

        let id_of = |token: &SpecialToken| {
            core.token_to_id(&token.content)
                .ok_or_else(|| core_error(path, format!("special token {:?} is not in the vocabulary", token.content)))
        };
        let skipped =
            core.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        let special_ids = SpecialIds::resolve(options, id_of, skipped)?;
        let template = bos_eos_template(options, special_ids.bos, special_ids.eos).map_err(|e| core_error(path, e))?;
        core.with_post_processor(template);
        Ok(FastTokenizer {
            vocab_size: core.get_vocab_size(true),
            core,
            special_ids,
            legacy: options.legacy.unwrap_or(true),
            clean_up_tokenization_spaces: options.clean_up_tokenization_spaces,
        })
    }

    pub fn legacy(&self) -> bool {
        self.legacy
    }
    /// The size with added tokens: every id below it decodes.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    pub fn special_ids(&self) -> &SpecialIds {
        &self.special_ids
    }

    /// Whether `id` is a byte token (`<0xE4>`), as the `ByteFallback` decoder recognises them.
    pub(crate) fn is_byte_token(&self, id: TokenId) -> bool {
        self.byte_value(id).is_some()
    }

    /// The byte of a byte token (`<0xE4>`).
    pub(crate) fn byte_value(&self, id: TokenId) -> Option<u8> {
        let token = self.core.id_to_token(id)?;
        let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
        (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
    }

    /// The vocabulary entry of `id`.
    pub(crate) fn piece_of(&self, id: TokenId) -> Result<String> {
        self.core.id_to_token(id).ok_or_else(|| {
            Error::Tokenizer(format!("token id {id} is outside the vocabulary (size {})", self.vocab_size()))
        })
    }

    /// `tokenizer.encode(text, add_special_tokens=...)`.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        let encoding = self.core.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// An error naming `id` when it is outside the vocabulary (the core would skip it silently).
    pub(crate) fn check_id(&self, id: TokenId) -> Result<()> {
        self.piece_of(id).map(|_| ())
    }

    /// The core's `decode(ids, skip_special_tokens=True)`, before any clean-up.
    pub(crate) fn decode_raw(&self, ids: &[TokenId]) -> Result<String> {
        self.decode_core(ids, true)
    }

    fn decode_core(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        ids.iter().try_for_each(|&id| self.check_id(id))?;
        self.core.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// `tokenizer.decode(ids, skip_special_tokens=True)`.
    pub fn decode(&self, ids: &[TokenId]) -> Result<String> {
        Ok(self.clean_up(self.decode_core(ids, true)?))
    }

    /// `tokenizer.decode(ids, skip_special_tokens=False)`.
    pub fn decode_with_special_tokens(&self, ids: &[TokenId]) -> Result<String> {
        Ok(self.clean_up(self.decode_core(ids, false)?))
    }

    pub(crate) fn clean_up_enabled(&self) -> bool {
        self.clean_up_tokenization_spaces
    }

    fn clean_up(&self, text: String) -> String {
        if self.clean_up_tokenization_spaces {
            super::llama::clean_up_tokenization(text)
        } else {
            text
        }
    }
}

/// `LlamaTokenizerFast.update_post_processor`: `<s> $A` / `<s> $A </s>` as the configs ask.
fn bos_eos_template(
    options: &TokenizerOptions,
    bos_id: Option<TokenId>,
    eos_id: Option<TokenId>,
) -> std::result::Result<TemplateProcessing, String> {
    let mut ends: Vec<(String, TokenId)> = Vec::new();
    let mut wanted = |flag: bool, token: &Option<SpecialToken>, id: Option<TokenId>, name: &str| {
        if !flag {
            return Ok(None);
        }
        match (token, id) {
            (Some(token), Some(id)) => {
                ends.push((token.content.clone(), id));
                Ok(Some(token.content.clone()))
            }
            _ => Err(format!("add_{name}_token = True but {name}_token = None")),
        }
    };
    let bos = wanted(options.add_bos_token, &options.bos_token, bos_id, "bos")?;
    let eos = wanted(options.add_eos_token, &options.eos_token, eos_id, "eos")?;
    let with = |sequence: &str, type_id: u8| {
        let mut parts = Vec::new();
        parts.extend(bos.as_ref().map(|b| format!("{b}:{type_id}")));
        parts.push(format!("${sequence}:{type_id}"));
        parts.extend(eos.as_ref().map(|e| format!("{e}:{type_id}")));
        parts.join(" ")
    };
    let single = with("A", 0);
    let pair = format!("{single} {}", with("B", 1));
    let mut builder = TemplateProcessing::builder();
    builder.try_single(single)?.try_pair(pair)?.special_tokens(ends);
    builder.build().map_err(|e| e.to_string())
}

/// The `added_tokens_decoder` entries of tokenizer_config.json in id order, with `AddedToken`'s
/// defaults for the fields an entry leaves out.
pub(crate) fn config_added_tokens(settings: &TokenizerSettings) -> Vec<ConfigAddedToken> {
    let added = settings.added_tokens_decoder.iter().map(|(_, token)| {
        let fields = token.fields();
        let special = fields.special.unwrap_or(false);
        ConfigAddedToken {
            content: token.content.clone(),
            lstrip: fields.lstrip.unwrap_or(false),
            rstrip: fields.rstrip.unwrap_or(false),
            single_word: fields.single_word.unwrap_or(false),
            // Special tokens are matched in the raw text.
            normalized: fields.normalized.unwrap_or(!special),
            special,
        }
    });
    added.collect()
}

/// The fast tokenizer's stream. Its byte-fallback decoder turns a whole run of byte tokens into
/// U+FFFD when any byte of the run is invalid, so a run can change until it ends: text is released
/// up to the last token that is neither a byte token nor skipped (a skipped special token joins the
/// runs on its sides). Each push decodes the ids before that point again; generation lengths keep
/// that cheap.
#[derive(Debug, Clone)]
pub(crate) struct FastStream<'t> {
    tokenizer: &'t FastTokenizer,
    ids: Vec<TokenId>,
    /// How many ids end in a token that a later id cannot change.
    settled: usize,
    released: String,
}

impl<'t> FastStream<'t> {
    pub(crate) fn new(tokenizer: &'t FastTokenizer) -> Self {
        FastStream { tokenizer, ids: Vec::new(), settled: 0, released: String::new() }
    }

    pub(crate) fn push(&mut self, id: TokenId) -> Result<String> {
        self.tokenizer.check_id(id)?;
        self.ids.push(id);
        if self.tokenizer.special_ids.is_special(id) || self.tokenizer.is_byte_token(id) {
            return Ok(String::new());
        }
        self.settled = self.ids.len();
        if self.tokenizer.clean_up_enabled() {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode_raw(&self.ids[..self.settled])?;
        // Text that does not extend what was released waits for `finish`.
        match text.strip_prefix(self.released.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.released.push_str(&new);
                Ok(new)
            }
            _ => Ok(String::new()),
        }
    }

    pub(crate) fn finish(self) -> String {
        // The ids were checked on push, so decoding them again cannot fail.
        let text = self.tokenizer.decode(&self.ids).unwrap_or_default();
        match text.strip_prefix(self.released.as_str()) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        }
    }
}
