//! `generation_config.json`, read once per model folder: the ids that start, end and pad a generation,
//! and the sampling defaults the model ships with.
use super::chooser::TokenChooser;
use crate::config::{read_json, ArcanaConfig};
use crate::error::Result;
use serde::Deserialize;
use std::path::Path;

/// transformers' `GenerationConfig` defaults for what the file leaves unset.
const DEFAULT_TOP_K: i64 = 50;
const DEFAULT_TOP_P: f64 = 1.0;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: i64,
    pub eos_token_ids: Vec<i64>,
    /// Fills finished rows; transformers falls back to the first EOS id.
    pub pad_token_id: Option<i64>,
    /// Sampling defaults of the file (Vicuna's sets `top_p: 0.6`); `None` where it sets none.
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize, Default)]
struct GenerationConfigFile {
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
}

impl GenerationConfig {
    /// `generation_config.json` when the folder has one; ids it leaves unset come from the model config.
    pub fn from_model_dir(dir: &Path, config: &ArcanaConfig) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let file: GenerationConfigFile =
            if path.is_file() { read_json(&path)? } else { GenerationConfigFile::default() };
        let eos_token_ids = match file.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![config.eos_token_id],
        };
        Ok(Self {
            bos_token_id: file.bos_token_id.unwrap_or(config.bos_token_id),
            eos_token_ids,
            pad_token_id: file.pad_token_id.or(config.pad_token_id),
            top_k: file.top_k,
            top_p: file.top_p,
        })
    }

    /// What fills the rows that already met EOS.
    pub fn pad(&self) -> i64 {
        self.pad_token_id.or(self.eos_token_ids.first().copied()).unwrap_or(0)
    }

    /// The release's rule: sample when the temperature is above 0, else greedy. Unset top-k / top-p
    /// come from this file, then from transformers' defaults (50, 1.0).
    pub fn chooser(&self, temperature: f64, top_k: Option<i64>, top_p: Option<f64>) -> Result<TokenChooser> {
        TokenChooser::new(
            temperature,
            top_k.or(self.top_k).unwrap_or(DEFAULT_TOP_K),
            top_p.or(self.top_p).unwrap_or(DEFAULT_TOP_P),
        )
    }

    /// Checks sampling settings before any model file is read (the model's own defaults are checked
    /// when [`chooser`](Self::chooser) resolves them).
    pub fn check_sampling(temperature: f64, top_k: Option<i64>, top_p: Option<f64>) -> Result<()> {
        TokenChooser::new(temperature, top_k.unwrap_or(DEFAULT_TOP_K), top_p.unwrap_or(DEFAULT_TOP_P)).map(|_| ())
    }
}
