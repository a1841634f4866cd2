//! Loading a tokenizer from a Hugging Face model folder: `tokenizer.model` or `tokenizer.json`, plus
//! the options that `tokenizer_config.json` and `special_tokens_map.json` give `from_pretrained`.
use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::fast::{config_added_tokens, FastTokenizer};
use super::llama::{SpecialToken, TokenizerOptions};
use super::Tokenizer;
use crate::prompt::conversation::model_name_from_path;
use crate::{Error, Result};

const MODEL_FILE: &str = "tokenizer.model";
const FAST_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
const NAMED_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

fn read_json(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    match serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })? {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(config_error(path, "<root>", "expected a JSON object")),
    }
}

fn config_error(path: &Path, field: &str, message: &str) -> Error {
    Error::Config { path: path.into(), field: field.into(), message: message.into() }
}

fn flag(map: &serde_json::Map<String, Value>, key: &str, path: &Path, field: &str) -> Result<bool> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(config_error(path, field, &format!("`{key}` must be a boolean"))),
    }
}

/// A token written as `"<s>"` or as `{"content": "<s>", "lstrip": false, ...}`; `null` is none.
fn parse_token(value: &Value, path: &Path, field: &str) -> Result<Option<SpecialToken>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(SpecialToken::new(s.clone()))),
        Value::Object(map) => {
            if flag(map, "single_word", path, field)? {
                return Err(config_error(path, field, "single_word tokens are not supported"));
            }
            let content = map
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| config_error(path, field, "expected a `content` string"))?;
            Ok(Some(SpecialToken {
                content: content.to_string(),
                lstrip: flag(map, "lstrip", path, field)?,
                rstrip: flag(map, "rstrip", path, field)?,
            }))
        }
        _ => Err(config_error(path, field, "expected a string, an object or null")),
    }
}

fn bool_field(map: &serde_json::Map<String, Value>, key: &str, path: &Path) -> Result<Option<bool>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(config_error(path, key, "expected a boolean")),
    }
}

/// Applies one JSON file's special-token fields to `options`; returns the named ones it set.
fn apply_tokens(
    map: &serde_json::Map<String, Value>,
    path: &Path,
    options: &mut TokenizerOptions,
) -> Result<Vec<&'static str>> {
    let mut set = Vec::new();
    for key in NAMED_TOKENS {
        let Some(value) = map.get(key) else { continue };
        *named_slot(options, key) = parse_token(value, path, key)?;
        set.push(key);
    }
    if let Some(value) = map.get("additional_special_tokens") {
        let list =
            value.as_array().ok_or_else(|| config_error(path, "additional_special_tokens", "expected a list"))?;
        options.additional_special_tokens = list
            .iter()
            .map(|v| parse_token(v, path, "additional_special_tokens"))
            .filter_map(Result::transpose)
            .collect::<Result<_>>()?;
    }
    Ok(set)
}

fn named_slot<'o>(options: &'o mut TokenizerOptions, key: &str) -> &'o mut Option<SpecialToken> {
    match key {
        "bos_token" => &mut options.bos_token,
        "eos_token" => &mut options.eos_token,
        "unk_token" => &mut options.unk_token,
        _ => &mut options.pad_token,
    }
}

/// `added_tokens_decoder` gives its strip flags to the special tokens that the config names, as
/// `from_pretrained` does; a named token left at its default keeps plain flags (transformers 4.37.2
/// re-adds the default over the declared entry). Entries that are not special tokens would be
/// tokens beyond the SentencePiece vocabulary or non-special added tokens: not implemented here.
fn apply_added_tokens(
    map: &serde_json::Map<String, Value>,
    path: &Path,
    named_in_config: &[&str],
    options: &mut TokenizerOptions,
) -> Result<()> {
    let field = "added_tokens_decoder";
    let Some(value) = map.get(field) else {
        return Ok(());
    };
    let entries = value.as_object().ok_or_else(|| config_error(path, field, "expected an object"))?;
    let mut declared: HashMap<String, SpecialToken> = HashMap::new();
    for (id, entry) in entries {
        let token = parse_token(entry, path, field)?
            .ok_or_else(|| config_error(path, field, &format!("entry {id} is null")))?;
        if entry.get("special").and_then(Value::as_bool) == Some(false) {
            let message = format!("non-special added token {:?} is not supported", token.content);
            return Err(config_error(path, field, &message));
        }
        declared.insert(token.content.clone(), token);
    }
    for key in named_in_config {
        if let Some(slot) = named_slot(options, key) {
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
        return Err(config_error(path, field, &message));
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

/// The options both classes read from `tokenizer_config.json` and `special_tokens_map.json` (the
/// latter wins, as in transformers), with the config itself for what only one class reads.
fn read_options(dir: &Path) -> Result<(TokenizerOptions, serde_json::Map<String, Value>, Vec<&'static str>)> {
    let config_path = dir.join(CONFIG_FILE);
    let map_path = dir.join(SPECIAL_TOKENS_FILE);
    let mut options = TokenizerOptions::default();
    let config = read_json(&config_path)?.unwrap_or_default();
    if let Some(v) = bool_field(&config, "add_bos_token", &config_path)? {
        options.add_bos_token = v;
    }
    if let Some(v) = bool_field(&config, "add_eos_token", &config_path)? {
        options.add_eos_token = v;
    }
    options.legacy = bool_field(&config, "legacy", &config_path)?;
    if let Some(v) = bool_field(&config, "clean_up_tokenization_spaces", &config_path)? {
        options.clean_up_tokenization_spaces = v;
    }
    let mut named = apply_tokens(&config, &config_path, &mut options)?;
    if let Some(special_map) = read_json(&map_path)? {
        named.extend(apply_tokens(&special_map, &map_path, &mut options)?);
    }
    Ok((options, config, named))
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
        let (mut options, config, named) = read_options(dir)?;
        let config_path = dir.join(CONFIG_FILE);
        match kind {
            TokenizerKind::Slow => {
                apply_added_tokens(&config, &config_path, &named, &mut options)?;
                Tokenizer::from_model_file(&dir.join(MODEL_FILE), options)
            }
            TokenizerKind::Fast => {
                let added = config_added_tokens(&config, &config_path)?;
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
