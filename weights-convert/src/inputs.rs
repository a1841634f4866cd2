//! Recognises the form of the input and gathers its tensors, config and side files, the way the
//! release's `load_pretrained_model` assembles a model from them.
use crate::lora;
use crate::output::OutDtype;
use crate::source::{read_checkpoint, TensorSet};
use crate::tokenizer_json;
use anyhow::{anyhow, bail, Context, Result};
use arcana::config::{resolve_vision_tower, VisionConfig, VisionTowerSource};
use arcana::model::VISION_TOWER_PREFIX;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use tch::Kind;

/// The folder name the output gives the vision tower's config files.
pub const VISION_TOWER_DIR: &str = "vision_tower";

const TOKENIZER_FILES: [&str; 5] =
    ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"];

pub struct ConvertModel {
    pub tensors: TensorSet,
    config: serde_json::Value,
    vision_config: serde_json::Value,
    preprocessor_config: serde_json::Value,
    /// Folders searched, in order, for tokenizer and generation files.
    side_file_dirs: Vec<PathBuf>,
    /// `--merge-lora` folded the language branch into the base weights.
    language_merged: bool,
}

/// The config key telling the model that `--merge-lora` was applied.
pub const LANGUAGE_MERGED: &str = "mm_lora_language_merged";

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", path.display()))
}

/// transformers' CLIPImageProcessor settings of `openai/clip-vit-large-patch14-336`.
fn default_preprocessor_config() -> serde_json::Value {
    serde_json::json!({
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336}
    })
}

fn has_weights(dir: &Path) -> bool {
    ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
        .iter()
        .any(|f| dir.join(f).is_file())
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
    let training_output = lora::is_training_output(input);
    let projector_only = !training_output && input.join("mm_projector.bin").is_file() && !has_weights(input);
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

    let tower_name = config["mm_vision_tower"]
        .as_str()
        .or(config["vision_tower"].as_str())
        .ok_or_else(|| anyhow!("{}: no `mm_vision_tower`", config_path.display()))?
        .to_string();
    let source = vision_search
        .iter()
        .find_map(|dir| resolve_vision_tower(dir, &tower_name).ok())
        .ok_or_else(|| anyhow!("{}: cannot find vision tower `{tower_name}`", config_path.display()))?;
    let (vision_config, preprocessor_config) = match &source {
        VisionTowerSource::Folder(folder) => {
            // Vision folder first: the main checkpoint's copies override it, as in the release.
            if has_weights(folder) {
                tensors.add_checkpoint(folder, VISION_TOWER_PREFIX)?;
            }
            let vision_path = folder.join("config.json");
            VisionConfig::from_file(&vision_path)?;
            let raw = read_json(&vision_path)?;
            let vision = raw.get("vision_config").cloned().unwrap_or(raw);
            let pre_path = folder.join("preprocessor_config.json");
            let pre = if pre_path.is_file() { read_json(&pre_path)? } else { default_preprocessor_config() };
            (vision, pre)
        }
        VisionTowerSource::Embedded(_) => {
            (serde_json::to_value(VisionConfig::clip_vit_large_patch14_336())?, default_preprocessor_config())
        }
    };
    tensors.add_checkpoint(&weights_dir, "")?;
    if projector_only {
        let path = input.join("mm_projector.bin");
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
