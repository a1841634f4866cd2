//! LoRA forms: the release's LoRA training output (`non_lora_trainables.bin` + a PEFT adapter, over
//! `--model-base`), and `--merge-lora`, which folds MM-LoRA's language branch into the base weights.
//! Every merge is `W + scale * B @ A` in fp32, rounded once to the output dtype.
use crate::source::{read_checkpoint, LowRank, SourceTensor, TensorSet};
use anyhow::{anyhow, bail, Result};
use arcana::weights::{ADAPTER_CONFIG_FILE, NON_LORA_FILE};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Kind;
/// PEFT prefers the safetensors file when both exist.
const ADAPTER_FILES: [&str; 2] = ["adapter_model.safetensors", "adapter_model.bin"];
/// Prefix of every key PEFT saves for a `PeftModelForCausalLM`.
const PEFT_PREFIX: &str = "base_model.model.";

/// The fields of PEFT's `LoraConfig` that decide the merge.
struct AdapterConfig {
    path: PathBuf,
    r: i64,
    scale: f64,
    /// A list of module names (matched as PEFT does: equal, or ending in `.name`); `None` for PEFT's
    /// regex form, which is not checked.
    targets: Option<Vec<String>>,
}

impl AdapterConfig {
    fn read(path: &Path) -> Result<Self> {
        let v: serde_json::Value = arcana::config::read_json(path)?;
        let bad = |msg: String| anyhow!("{}: {msg}", path.display());
        if let Some(kind) = v["peft_type"].as_str().filter(|k| *k != "LORA") {
            return Err(bad(format!("peft_type `{kind}`; only LORA adapters can be merged")));
        }
        let r = v["r"].as_i64().unwrap_or(8);
        let alpha = v["lora_alpha"].as_f64().unwrap_or(8.0);
        if r <= 0 {
            return Err(bad(format!("r = {r}")));
        }
        let non_empty = |key: &str| v[key].as_object().is_some_and(|o| !o.is_empty());
        for key in ["rank_pattern", "alpha_pattern"] {
            if non_empty(key) {
                return Err(bad(format!("`{key}` (per-module ranks or alphas) is not supported")));
            }
        }
        if v["use_dora"].as_bool() == Some(true) {
            return Err(bad("use_dora: DoRA adapters are not supported".into()));
        }
        if v["bias"].as_str().is_some_and(|b| b != "none") {
            return Err(bad(format!("bias `{}`: adapters that train biases are not supported", v["bias"])));
        }
        if v["modules_to_save"].as_array().is_some_and(|a| !a.is_empty()) {
            return Err(bad("`modules_to_save` is not supported".into()));
        }
        // fan_in_fan_out is ignored: PEFT turns it off for nn.Linear targets.
        let scale = if v["use_rslora"].as_bool() == Some(true) { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        let targets = match &v["target_modules"] {
            serde_json::Value::Array(a) => Some(a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect()),
            serde_json::Value::String(_) => None,
            _ => return Err(bad("no `target_modules`".into())),
        };
        Ok(Self { path: path.to_path_buf(), r, scale, targets })
    }

    fn targets(&self, module: &str) -> bool {
        self.targets.as_ref().is_none_or(|t| t.iter().any(|k| module == k || module.ends_with(&format!(".{k}"))))
    }
}

/// The release's renames: drop a leading `base_model.`, then, if any key starts with `model.model.`, a
/// leading `model.` from every key.
fn non_lora_names(raw: Vec<(String, SourceTensor)>) -> Vec<(String, SourceTensor)> {
    let stripped: Vec<_> =
        raw.into_iter().map(|(k, t)| (k.strip_prefix("base_model.").map(str::to_string).unwrap_or(k), t)).collect();
    if !stripped.iter().any(|(k, _)| k.starts_with("model.model.")) {
        return stripped;
    }
    stripped.into_iter().map(|(k, t)| (k.strip_prefix("model.").map(str::to_string).unwrap_or(k), t)).collect()
}

/// Adds `non_lora_trainables.bin` over the base and merges the adapter into the matching weights.
pub fn apply_training_output(tensors: &mut TensorSet, input: &Path) -> Result<()> {
    let non_lora = input.join(NON_LORA_FILE);
    if !non_lora.is_file() {
        bail!("{}: has {ADAPTER_CONFIG_FILE} but no {NON_LORA_FILE}", input.display());
    }
    for (name, tensor) in non_lora_names(read_checkpoint(&non_lora)?) {
        if let Some(old) = tensors.tensors.get(&name).filter(|old| old.shape != tensor.shape) {
            bail!(
                "{}: `{name}` has shape {:?}, the base's {:?} (from {})",
                non_lora.display(),
                tensor.shape,
                old.shape,
                old.file.display()
            );
        }
        // The release loads them into its fp16 model, which rounds them to fp16.
        tensors.tensors.insert(name, tensor.rounded_through(Kind::Half, Dtype::F16));
    }
    let config_path = input.join(ADAPTER_CONFIG_FILE);
    if !config_path.is_file() {
        bail!("{}: has {NON_LORA_FILE} but no {ADAPTER_CONFIG_FILE}", input.display());
    }
    let config = AdapterConfig::read(&config_path)?;
    let adapter = ADAPTER_FILES
        .iter()
        .map(|f| input.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{}: no {} or {}", input.display(), ADAPTER_FILES[0], ADAPTER_FILES[1]))?;
    merge_adapter(tensors, &config, &adapter)
}

fn merge_adapter(tensors: &mut TensorSet, config: &AdapterConfig, adapter: &Path) -> Result<()> {
    let file = adapter.display();
    let mut pairs: BTreeMap<String, [Option<(String, SourceTensor)>; 2]> = BTreeMap::new();
    let mut ignored = Vec::new();
    for (key, tensor) in read_checkpoint(adapter)? {
        let name = key
            .strip_prefix(PEFT_PREFIX)
            .ok_or_else(|| anyhow!("{file}: tensor `{key}` does not start with `{PEFT_PREFIX}`"))?;
        let (module, side) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else if name.contains("lora_embedding_") {
            bail!("{file}: tensor `{key}`: LoRA on embeddings is not supported");
        } else if name.contains("lora_") {
            // e.g. MM-LoRA's own `V_Slora_A.weight`: PEFT files it under an adapter-named parameter the
            // model lacks, and `load_state_dict(strict=False)` drops it; the base's tensor stays.
            ignored.push(key);
            continue;
        } else {
            bail!("{file}: tensor `{key}` is not a LoRA A/B weight");
        };
        let module = module.to_string();
        pairs.entry(module).or_default()[side] = Some((key, tensor));
    }
    if !ignored.is_empty() {
        eprintln!(
            "{file}: ignoring {} tensors that the release's PEFT loading drops, e.g. `{}`",
            ignored.len(),
            ignored[0]
        );
    }
    if pairs.is_empty() {
        bail!("{file}: no `lora_A` / `lora_B` weights");
    }
    for (module, [a, b]) in pairs {
        let (Some((a_key, a)), Some((b_key, b))) = (a, b) else {
            bail!("{file}: module `{module}` has only one of `lora_A.weight` and `lora_B.weight`");
        };
        if !config.targets(&module) {
            bail!(
                "{file}: `{a_key}` names module `{module}`, which is not in target_modules of {}",
                config.path.display()
            );
        }
        let weight_name = format!("{module}.weight");
        let weight = tensors.tensors.remove(&weight_name).ok_or_else(|| {
            anyhow!("{file}: `{a_key}` names module `{module}`, which the model does not have (no `{weight_name}` in the base or {NON_LORA_FILE})")
        })?;
        let (w, r) = (&weight.shape, config.r);
        let ok = w.len() == 2 && a.shape == [r, w[1]] && b.shape == [w[0], r];
        if !ok {
            bail!(
                "{file}: `{a_key}` {:?} and `{b_key}` {:?} do not fit `{weight_name}` {w:?} with r = {r} ({}); rank mismatch?",
                a.shape,
                b.shape,
                config.path.display()
            );
        }
        let merged = weight.plus(LowRank::new(&a, &b, config.scale));
        tensors.tensors.insert(weight_name, merged);
    }
    Ok(())
}

/// `--merge-lora`: `W' = W + scale * L_B @ L_A` for every MM-LoRA projection. The language branch's
/// tensors stay: the model subtracts that branch again at visual positions.
pub fn merge_language_branch(tensors: &mut TensorSet, scale: f64) -> Result<usize> {
    let modules: Vec<String> =
        tensors.tensors.keys().filter_map(|k| k.strip_suffix(".L_Slora_A.weight").map(str::to_string)).collect();
    if modules.is_empty() {
        bail!("--merge-lora: the checkpoint has no MM-LoRA language branch (`*.L_Slora_A.weight`)");
    }
    for module in &modules {
        let get = |suffix: &str| {
            let name = format!("{module}.{suffix}");
            tensors.tensors.get(&name).cloned().ok_or_else(|| anyhow!("--merge-lora: `{name}` is missing"))
        };
        let (weight, a, b) = (get("weight")?, get("L_Slora_A.weight")?, get("L_Slora_B.weight")?);
        let w = &weight.shape;
        if w.len() != 2 || a.shape.len() != 2 || a.shape[1] != w[1] || b.shape != [w[0], a.shape[0]] {
            bail!(
                "--merge-lora: `{module}`: L_Slora_A {:?} and L_Slora_B {:?} do not fit the weight {w:?} (from {})",
                a.shape,
                b.shape,
                weight.file.display()
            );
        }
        tensors.tensors.insert(format!("{module}.weight"), weight.plus(LowRank::new(&a, &b, scale)));
    }
    Ok(modules.len())
}
