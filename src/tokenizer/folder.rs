//! Loading a tokenizer from a Hugging Face model folder: `tokenizer.model` or `tokenizer.json`, plus
//! the options that `tokenizer_config.json` and `special_tokens_map.json` give `from_pretrained`.
use std::collections::HashMap;
use std::path::Path;

use super::fast::{config_added_tokens, FastTokenizer};
use super::llama::{SpecialToken, TokenizerOptions};
use super::settings::{TokenizerSettings, WrittenToken};
use super::Tokenizer;
use crate::config::config_error;
use crate::prompt::conversation::model_name_from_path;
use crate::{Error, Result};

const MODEL_FILE: &str = "tokenizer.model";
const FAST_FILE: &str = "tokenizer.json";

/// The token the slow tokenizer matches in text: strip flags as written (absent is false).
fn special_token(token: &WrittenToken, path: &Path, field: &str) -> Result<SpecialToken> {
    let fields = token.fields();
    if fields.single_word == Some(true) {
        return Err(config_error(path, field, "single_word tokens are not supported"));
    }
    Ok(SpecialToken {
        content: token.content.clone(),
        lstrip: fields.lstrip.unwrap_or(false),
        rstrip: fields.rstrip.unwrap_or(false),
    })
}

fn named_slot<'o>(options: &'o mut TokenizerOptions, key: &str) -> &'o mut Option<SpecialToken> {
    match key {
        "bos_token" => &mut options.bos_token,
        "eos_token" => &mut options.eos_token,
        "unk_token" => &mut options.unk_token,
        _ => &mut options.pad_token,
    }
}

/// `added_tokens_decoder` gives its strip flags to the special tokens that the configs name, as
/// `from_pretrained` does; a named token left at its default keeps plain flags (transformers 4.37.2
/// re-adds the default over the declared entry). Entries that are not special tokens would be
/// tokens beyond the SentencePiece vocabulary or non-special added tokens: not implemented here.
fn apply_added_tokens(settings: &TokenizerSettings, options: &mut TokenizerOptions) -> Result<()> {
    let (path, field) = (&settings.config_path, "added_tokens_decoder");
    let mut declared: HashMap<String, SpecialToken> = HashMap::new();
    for (_, entry) in &settings.added_tokens_decoder {
        let token = special_token(entry, path, field)?;
        if entry.fields().special == Some(false) {
            let message = format!("non-special added token {:?} is not supported", token.content);
            return Err(config_error(path, field, message));
        }
        declared.insert(token.content.clone(), token);
    }
    for named in &settings.named {
        if let Some(slot) = named_slot(options, named.key) {
            if let Some(t) = declared.get(&slot.content) {
                *slot = t.clone();
            }
        }
    }
    for slot in options.additional_special_tokens.iter_mut() {
        if let Some(t) = declared.get(&slot.content) {
            *slot = t.clone();
        }
    }
    let named = [&options.bos_token, &options.eos_token, &options.unk_token, &options.pad_token];
    let mut special = named.into_iter().flatten().chain(&options.additional_special_tokens);
    if let Some(content) = declared.keys().find(|c| !special.any(|t| &t.content == *c)) {
        let message = format!("added token {content:?} is not a special token (not supported)");
        return Err(config_error(path, field, message));
    }
    Ok(())
}

/// Which class transformers builds: `LlamaTokenizer` (slow, tokenizer.model) or
/// `LlamaTokenizerFast` (fast, tokenizer.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    Slow,
    Fast,
}

impl TokenizerKind {
    /// The choice of `load_pretrained_model` (arcana/model/builder.py): `AutoTokenizer`'s default,
    /// the fast tokenizer, for a model loaded without a base whose name contains "mistral" (or
    /// "mpt"); `use_fast=False` everywhere else.
    pub fn release_choice(model_name: &str, has_model_base: bool) -> Self {
        let name = model_name.to_lowercase();
        if !has_model_base && (name.contains("mistral") || name.contains("mpt")) {
            TokenizerKind::Fast
        } else {
            TokenizerKind::Slow
        }
    }

    fn file(self) -> &'static str {
        match self {
            TokenizerKind::Slow => MODEL_FILE,
            TokenizerKind::Fast => FAST_FILE,
        }
    }
}

/// The options both classes take from the folder's configs.
fn read_options(settings: &TokenizerSettings) -> Result<TokenizerOptions> {
    let mut options = TokenizerOptions::default();
    if let Some(v) = settings.add_bos_token {
        options.add_bos_token = v;
    }
    if let Some(v) = settings.add_eos_token {
        options.add_eos_token = v;
    }
    options.legacy = settings.legacy;
    if let Some(v) = settings.clean_up_tokenization_spaces {
        options.clean_up_tokenization_spaces = v;
    }
    for named in &settings.named {
        *named_slot(&mut options, named.key) =
            named.token.as_ref().map(|t| special_token(t, &named.path, named.key)).transpose()?;
    }
    if let Some((path, tokens)) = &settings.additional_special_tokens {
        options.additional_special_tokens =
            tokens.iter().map(|t| special_token(t, path, "additional_special_tokens")).collect::<Result<_>>()?;
    }
    Ok(options)
}

impl Tokenizer {
    /// Loads the slow tokenizer from `<dir>/tokenizer.model`, or the fast one from
    /// `<dir>/tokenizer.json` when the folder has no tokenizer.model, with the options of
    /// `<dir>/tokenizer_config.json` and `<dir>/special_tokens_map.json` (both optional).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        Self::from_folder_as(dir, TokenizerKind::Slow)
    }

    /// Loads `preferred` when the folder has its file, else the other kind (saying so on stderr
    /// when the release would have loaded something else); an error when it has neither.
    pub fn from_folder_as(dir: &Path, preferred: TokenizerKind) -> Result<Self> {
        let other = match preferred {
            TokenizerKind::Slow => TokenizerKind::Fast,
            TokenizerKind::Fast => TokenizerKind::Slow,
        };
        let kind = if dir.join(preferred.file()).is_file() {
            preferred
        } else if dir.join(other.file()).is_file() {
            other
        } else {
            let missing =
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("not found, nor {FAST_FILE} beside it"));
            return Err(Error::io(dir.join(MODEL_FILE), missing));
        };
        match (preferred, kind) {
            (TokenizerKind::Fast, TokenizerKind::Slow) => eprintln!(
                "{}: no {FAST_FILE}; using the slow tokenizer of {MODEL_FILE} (arcana-convert writes a {FAST_FILE} from it)",
                dir.display()
            ),
            (TokenizerKind::Slow, TokenizerKind::Fast) => eprintln!(
                "{}: no {MODEL_FILE}; using the fast tokenizer of {FAST_FILE}",
                dir.display()
            ),
            _ => {}
        }
        let settings = TokenizerSettings::read(dir)?;
        let mut options = read_options(&settings)?;
        match kind {
            TokenizerKind::Slow => {
                apply_added_tokens(&settings, &mut options)?;
                Tokenizer::from_model_file(&dir.join(MODEL_FILE), options)
            }
            TokenizerKind::Fast => {
                let added = config_added_tokens(&settings);
                FastTokenizer::from_file(&dir.join(FAST_FILE), &options, &added).map(Tokenizer::from)
            }
        }
    }

    /// The tokenizer that the release's CLI loads for `--model-path model_path` (with or without
    /// `--model-base`), read from `dir` (the model folder, or the one assembled from a base).
    pub fn for_release(dir: &Path, model_path: &Path, has_model_base: bool) -> Result<Self> {
        // A lone `checkpoint-N` path has no name; the release's name rules then pick the slow one.
        let model_name = model_name_from_path(&model_path.to_string_lossy()).unwrap_or_default();
        Self::from_folder_as(dir, TokenizerKind::release_choice(&model_name, has_model_base))
    }
}
