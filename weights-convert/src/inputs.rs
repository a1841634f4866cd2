//! Recognises the form of the input and gathers its tensors, config and side files, the way the
//! release's `load_pretrained_model` assembles a model from them.
use crate::lora;
use crate::output::OutDtype;
use crate::source::{read_checkpoint, TensorSet};
use crate::tokenizer_json;
use anyhow::{anyhow, bail, Context, Result};
use arcana::config::{resolve_vision_tower, VisionConfig, VisionTowerSource};
use arcana::model::VISION_TOWER_PREFIX;
use arcana::vision::preprocess::PreprocessConfig;
use arcana::weights::{FolderForm, PROJECTOR_FILE};
use safetensors::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Kind;

/// The folder name the output gives the vision tower's config files.
pub const VISION_TOWER_DIR: &str = "vision_tower";

const TOKENIZER_FILES: [&str; 5] =
    ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"];

pub struct ConvertModel {
    pub tensors: TensorSet,
    config: Value,
    vision_config: Value,
    preprocessor_config: Value,
    /// Folders searched, in order, for tokenizer and generation files.
    side_file_dirs: Vec<PathBuf>,
    /// `--merge-lora` folded the language branch into the base weights.
    language_merged: bool,
}

/// The config key telling the model that `--merge-lora` was applied.
pub const LANGUAGE_MERGED: &str = "mm_lora_language_merged";

fn read_json(path: &Path) -> Result<Value> {
    Ok(arcana::config::read_json(path)?)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", path.display()))
}

pub fn gather(input: &Path, model_base: Option<&Path>, merge_lora: bool) -> Result<ConvertModel> {
    if !input.is_dir() {
        bail!("{}: not a folder", input.display());
    }
    let config_path = input.join("config.json");
    let config = read_json(&config_path)?;
    // Validate like the loader will, so a broken config fails before anything is written.
    let parsed = arcana::config::ArcanaConfig::from_file(&config_path)?;
    if merge_lora && parsed.mm_lora_language_merged {
        bail!("{}: `{LANGUAGE_MERGED}` is already true; --merge-lora would merge twice", config_path.display());
    }
    let form = FolderForm::of(input);
    let training_output = form == FolderForm::LoraTrainingOutput;
    let projector_only = form == FolderForm::ProjectorOnly;
    let mut tensors = TensorSet::default();
    let mut side_file_dirs = vec![input.to_path_buf()];
    let mut vision_search = vec![input.to_path_buf()];
    let weights_dir = if projector_only || training_output {
        let holds = if training_output { "is LoRA training output" } else { "holds only mm_projector.bin" };
        let base = model_base.ok_or_else(|| anyhow!("{}: {holds}; pass --model-base", input.display()))?;
        side_file_dirs.push(base.to_path_buf());
        vision_search.push(base.to_path_buf());
        base.to_path_buf()
    } else {
        input.to_path_buf()
    };

    let tower_name =
        parsed.vision_tower_name().ok_or_else(|| anyhow!("{}: no `mm_vision_tower`", config_path.display()))?;
    // The model folder, then the base: each error lists the places it tried.
    let mut tried = Vec::new();
    let source = vision_search
        .iter()
        .find_map(|dir| resolve_vision_tower(dir, tower_name).map_err(|e| tried.push(e.to_string())).ok())
        .ok_or_else(|| anyhow!("{}", tried.join("\n")))?;
    let (vision_config, preprocessor_config) = match &source {
        VisionTowerSource::Folder(folder) => {
            // Vision folder first: the main checkpoint's copies override it, as in the release.
            if FolderForm::has_checkpoint(folder) {
                tensors.add_checkpoint(folder, VISION_TOWER_PREFIX)?;
            }
            let vision_path = folder.join("config.json");
            VisionConfig::from_file(&vision_path)?;
            let raw = read_json(&vision_path)?;
            let vision = raw.get("vision_config").cloned().unwrap_or(raw);
            let pre_path = folder.join("preprocessor_config.json");
            // transformers' CLIPImageProcessor settings of `openai/clip-vit-large-patch14-336` otherwise.
            let pre = if pre_path.is_file() { read_json(&pre_path)? } else { PreprocessConfig::default().to_json() };
            (vision, pre)
        }
        VisionTowerSource::Embedded(_) => {
            (serde_json::to_value(VisionConfig::clip_vit_large_patch14_336())?, PreprocessConfig::default().to_json())
        }
    };
    tensors.add_checkpoint(&weights_dir, "")?;
    if projector_only {
        let path = input.join(PROJECTOR_FILE);
        for (name, tensor) in read_checkpoint(&path)? {
            // The release casts the projector to fp16 before loading it into the fp16 base model.
            tensors.tensors.insert(name, tensor.rounded_through(Kind::Half, Dtype::F16));
        }
    }
    if training_output {
        lora::apply_training_output(&mut tensors, input)?;
    }
    if merge_lora {
        let n = lora::merge_language_branch(&mut tensors, parsed.lora_scaling())?;
        eprintln!("--merge-lora: folded the language branch into {n} projections");
    }
    let language_merged = merge_lora || parsed.mm_lora_language_merged;
    Ok(ConvertModel { tensors, config, vision_config, preprocessor_config, side_file_dirs, language_merged })
}

impl ConvertModel {
    /// The output's base weights hold the language branch (`--merge-lora` now or in the source).
    pub fn language_merged(&self) -> bool {
        self.language_merged
    }

    /// The config ties lm_head to the token embeddings.
    pub fn tied(&self) -> bool {
        self.config["tie_word_embeddings"].as_bool().unwrap_or(false)
    }

    /// config.json (pointing at the bundled vision tower config), the vision tower folder's configs,
    /// tokenizer and generation files, and tokenizer.json made from tokenizer.model when the source
    /// has none. None of these is in the manifest.
    pub fn write_side_files(&self, dir: &Path, out: OutDtype) -> Result<()> {
        let mut config = self.config.clone();
        config["mm_vision_tower"] = VISION_TOWER_DIR.into();
        config["torch_dtype"] = out.torch_name().into();
        if self.language_merged {
            config[LANGUAGE_MERGED] = true.into();
        }
        write_json(&dir.join("config.json"), &config)?;
        let vision_dir = dir.join(VISION_TOWER_DIR);
        std::fs::create_dir_all(&vision_dir)?;
        write_json(&vision_dir.join("config.json"), &self.vision_config)?;
        write_json(&vision_dir.join("preprocessor_config.json"), &self.preprocessor_config)?;
        let mut wrote_generation = false;
        for name in TOKENIZER_FILES.iter().chain(["generation_config.json"].iter()) {
            if let Some(src) = self.side_file_dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
                std::fs::copy(&src, dir.join(name)).with_context(|| format!("copying {}", src.display()))?;
                wrote_generation |= *name == "generation_config.json";
            }
        }
        // The fast tokenizer's file, converted as transformers would, so the folder needs no Python.
        if dir.join("tokenizer.model").is_file() && !dir.join("tokenizer.json").exists() {
            if let Err(e) = tokenizer_json::write(dir) {
                match e.downcast_ref::<tokenizer_json::Unsupported>() {
                    Some(why) => eprintln!("not writing tokenizer.json: {why}"),
                    None => {
                        let from = self.side_file_dirs.iter().map(|d| d.join("tokenizer.model")).find(|p| p.is_file());
                        let from = from.unwrap_or_else(|| dir.join("tokenizer.model"));
                        return Err(e.context(format!("making tokenizer.json from {}", from.display())));
                    }
                }
            }
        }
        if !wrote_generation {
            let ids = |key: &str, default: i64| config[key].as_i64().unwrap_or(default);
            let generation = serde_json::json!({
                "bos_token_id": ids("bos_token_id", 1),
                "eos_token_id": ids("eos_token_id", 2),
                "pad_token_id": ids("pad_token_id", 0),
            });
            write_json(&dir.join("generation_config.json"), &generation)?;
        }
        Ok(())
    }
}
