//! Loading a tokenizer from a Hugging Face model folder: `tokenizer.model` plus the options that
//! `tokenizer_config.json` and `special_tokens_map.json` give `LlamaTokenizer.from_pretrained`.
use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::llama::{SpecialToken, Tokenizer, TokenizerOptions};
use crate::{Error, Result};

const MODEL_FILE: &str = "tokenizer.model";
const CONFIG_FILE: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
const NAMED_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

fn read_json(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    match serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })? {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(config_error(path, "<root>", "expected a JSON object")),
    }
}

fn config_error(path: &Path, field: &str, message: &str) -> Error {
    Error::Config {
        path: path.into(),
        field: field.into(),
        message: message.into(),
    }
}

fn flag(map: &serde_json::Map<String, Value>, key: &str, path: &Path, field: &str) -> Result<bool> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(config_error(
            path,
            field,
            &format!("`{key}` must be a boolean"),
        )),
    }
}

/// A token written as `"<s>"` or as `{"content": "<s>", "lstrip": false, ...}`; `null` is none.
fn parse_token(value: &Value, path: &Path, field: &str) -> Result<Option<SpecialToken>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(SpecialToken::new(s.clone()))),
        Value::Object(map) => {
            if flag(map, "single_word", path, field)? {
                return Err(config_error(
                    path,
                    field,
                    "single_word tokens are not supported",
                ));
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
        _ => Err(config_error(
            path,
            field,
            "expected a string, an object or null",
        )),
    }
}

fn bool_field(
    map: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
) -> Result<Option<bool>> {
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
        let list = value
            .as_array()
            .ok_or_else(|| config_error(path, "additional_special_tokens", "expected a list"))?;
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
    let entries = value
        .as_object()
        .ok_or_else(|| config_error(path, field, "expected an object"))?;
    let mut declared: HashMap<String, SpecialToken> = HashMap::new();
    for (id, entry) in entries {
        let token = parse_token(entry, path, field)?
            .ok_or_else(|| config_error(path, field, &format!("entry {id} is null")))?;
        if entry.get("special").and_then(Value::as_bool) == Some(false) {
            let message = format!(
                "non-special added token {:?} is not supported",
                token.content
            );
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
    let named = [
        &options.bos_token,
        &options.eos_token,
        &options.unk_token,
        &options.pad_token,
    ];
    let mut special = named
        .into_iter()
        .flatten()
        .chain(&options.additional_special_tokens);
    if let Some(content) = declared.keys().find(|c| !special.any(|t| &t.content == *c)) {
        let message = format!("added token {content:?} is not a special token (not supported)");
        return Err(config_error(path, field, &message));
    }
    Ok(())
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.model` with the options of `<dir>/tokenizer_config.json` and
    /// `<dir>/special_tokens_map.json` (both optional; the latter wins, as in transformers).
    pub fn from_folder(dir: &Path) -> Result<Self> {
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
        apply_added_tokens(&config, &config_path, &named, &mut options)?;
        Tokenizer::from_model_file(&dir.join(MODEL_FILE), options)
    }
}
