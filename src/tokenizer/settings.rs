//! What `tokenizer_config.json` and `special_tokens_map.json` say, read once and kept as written:
//! the tokenizers built here take their options from it, and `arcana-convert` its tokenizer.json's
//! special tokens (which needs to know which flags a file spells out).
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{config_error, read_json_object};
use crate::Result;

const CONFIG_FILE: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
/// The special tokens a config names one by one.
const NAMED_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// A token as a config file writes it: a bare string (`fields` is `None`) or an `AddedToken` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenToken {
    pub content: String,
    pub fields: Option<AddedTokenFields>,
}

/// The fields of an `AddedToken` object; a field the file leaves out is `None`, since transformers
/// fills missing ones differently by context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AddedTokenFields {
    /// `"__type": "AddedToken"`: in tokenizer_config.json `from_pretrained` turns only such objects
    /// into tokens.
    pub typed: bool,
    pub single_word: Option<bool>,
    pub lstrip: Option<bool>,
    pub rstrip: Option<bool>,
    pub normalized: Option<bool>,
    pub special: Option<bool>,
}

impl WrittenToken {
    /// `null` is no token; `field` names the entry in errors.
    fn parse(value: &Value, path: &Path, field: &str) -> Result<Option<Self>> {
        let map = match value {
            Value::Null => return Ok(None),
            Value::String(s) => return Ok(Some(WrittenToken { content: s.clone(), fields: None })),
            Value::Object(map) => map,
            _ => return Err(config_error(path, field, "expected a string, an object or null")),
        };
        let flag = |key: &str| optional_bool(map, key, path, field);
        let content = map
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| config_error(path, field, "expected a `content` string"))?;
        let fields = AddedTokenFields {
            typed: map.get("__type").and_then(Value::as_str) == Some("AddedToken"),
            single_word: flag("single_word")?,
            lstrip: flag("lstrip")?,
            rstrip: flag("rstrip")?,
            normalized: flag("normalized")?,
            special: flag("special")?,
        };
        Ok(Some(WrittenToken { content: content.to_string(), fields: Some(fields) }))
    }

    /// The token's fields, all unset for a bare string.
    pub fn fields(&self) -> AddedTokenFields {
        self.fields.unwrap_or_default()
    }
}

/// A named special token (`bos_token`, ...) as the last file that names it sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedToken {
    pub key: &'static str,
    /// `None`: the file sets it to `null`.
    pub token: Option<WrittenToken>,
    /// The file that set it.
    pub path: PathBuf,
}

/// The two files of a tokenizer folder, both optional; special_tokens_map.json is read after
/// tokenizer_config.json and wins, as in transformers' `from_pretrained`.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSettings {
    pub config_path: PathBuf,
    /// tokenizer_config.json as a whole, for what only one tokenizer class reads.
    pub config: Map<String, Value>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub legacy: Option<bool>,
    pub clean_up_tokenization_spaces: Option<bool>,
    /// The named tokens the files set, in [`NAMED_TOKENS`] order; a key neither file has is absent.
    pub named: Vec<NamedToken>,
    /// `additional_special_tokens` of the last file that has it, with that file.
    pub additional_special_tokens: Option<(PathBuf, Vec<WrittenToken>)>,
    /// tokenizer_config.json's `added_tokens_decoder` (ids and `AddedToken` objects), in id order.
    pub added_tokens_decoder: Vec<(u64, WrittenToken)>,
}

impl TokenizerSettings {
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config = read_json_object(&config_path)?.unwrap_or_default();
        let map_path = dir.join(SPECIAL_TOKENS_FILE);
        let special_map = read_json_object(&map_path)?;
        let bool_field = |key: &str| optional_bool(&config, key, &config_path, key);
        let mut settings = TokenizerSettings {
            add_bos_token: bool_field("add_bos_token")?,
            add_eos_token: bool_field("add_eos_token")?,
            legacy: bool_field("legacy")?,
            clean_up_tokenization_spaces: bool_field("clean_up_tokenization_spaces")?,
            added_tokens_decoder: added_tokens_decoder(&config, &config_path)?,
            ..Default::default()
        };
        for (path, map) in [(&config_path, Some(&config)), (&map_path, special_map.as_ref())] {
            let Some(map) = map else { continue };
            settings.apply_tokens(map, path)?;
        }
        settings.named.sort_by_key(|n| NAMED_TOKENS.iter().position(|k| *k == n.key));
        settings.config_path = config_path;
        settings.config = config;
        Ok(settings)
    }

    /// One file's special-token fields over what an earlier file set.
    fn apply_tokens(&mut self, map: &Map<String, Value>, path: &Path) -> Result<()> {
        for key in NAMED_TOKENS {
            let Some(value) = map.get(key) else { continue };
            let named = NamedToken { key, token: WrittenToken::parse(value, path, key)?, path: path.to_path_buf() };
            self.named.retain(|n| n.key != key);
            self.named.push(named);
        }
        let field = "additional_special_tokens";
        if let Some(value) = map.get(field) {
            let list = value.as_array().ok_or_else(|| config_error(path, field, "expected a list"))?;
            let tokens = list.iter().map(|v| WrittenToken::parse(v, path, field)).filter_map(Result::transpose);
            self.additional_special_tokens = Some((path.to_path_buf(), tokens.collect::<Result<_>>()?));
        }
        Ok(())
    }

    /// The named token `key` as the files set it: `None` when neither file names it.
    pub fn named(&self, key: &str) -> Option<&NamedToken> {
        self.named.iter().find(|n| n.key == key)
    }
}

/// The `added_tokens_decoder` entries: `AddedToken(**entry)` for each, keyed by id.
fn added_tokens_decoder(config: &Map<String, Value>, path: &Path) -> Result<Vec<(u64, WrittenToken)>> {
    let field = "added_tokens_decoder";
    let Some(value) = config.get(field) else {
        return Ok(Vec::new());
    };
    let entries = value.as_object().ok_or_else(|| config_error(path, field, "expected an object"))?;
    let mut tokens = Vec::new();
    for (id, entry) in entries {
        let bad = |what: &str| config_error(path, field, format!("entry {id:?}: {what}"));
        let index: u64 = id.parse().map_err(|_| bad("the key is not a token id"))?;
        // `AddedToken(**entry)`: an object; a bare string or null is not an entry.
        let object = if entry.is_object() { WrittenToken::parse(entry, path, field)? } else { None };
        let token = object.ok_or_else(|| bad("expected an object"))?;
        tokens.push((index, token));
    }
    tokens.sort_by_key(|(index, _)| *index);
    Ok(tokens)
}

/// `map[key]` as a boolean; absent or `null` is `None`, anything else an error on `field`.
fn optional_bool(map: &Map<String, Value>, key: &str, path: &Path, field: &str) -> Result<Option<bool>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(config_error(path, field, format!("`{key}` must be a boolean"))),
    }
}
