//! Model configuration: the release's `config.json` and the vision tower's CLIP config.
//!
//! Defaults are the ones the release (and transformers 4.37.2) falls back to when a field is absent.
//! Unknown fields are tolerated. Named choices (activations, projector, rope scaling, feature selection,
//! aspect mode) are parsed into enums as the file is read, so an unknown value is an error naming its
//! field; impossible numbers are rejected by `validate` with the field's name.
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The hub id whose CLIP config is embedded, so a checkpoint naming it needs no download.
pub const CLIP_VIT_L_336: &str = "openai/clip-vit-large-patch14-336";

/// `rope_scaling` of transformers' LlamaConfig: `{"type": "linear" | "dynamic", "factor": f}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    #[serde(rename = "type")]
    pub kind: RopeScalingKind,
    pub factor: f64,
}

/// Implements `TryFrom<String>` for a config enum from its accepted spellings; `$expected` ends the error.
macro_rules! config_choice {
    ($ty:ident, $expected:literal, { $($name:literal => $value:expr),+ $(,)? }) => {
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(value: String) -> std::result::Result<Self, String> {
                match value.as_str() {
                    $($name => Ok($value),)+
                    _ => Err(format!("unsupported value `{value}` ({})", $expected)),
                }
            }
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum RopeScalingKind {
    Linear,
    Dynamic,
}
config_choice!(RopeScalingKind, "expected linear or dynamic", { "linear" => Self::Linear, "dynamic" => Self::Dynamic });

/// The decoder MLP's `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum DecoderActivation {
    Silu,
}
config_choice!(DecoderActivation, "the release's Llama uses silu", { "silu" => Self::Silu });

/// CLIP's `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 * x)` (transformers' QuickGELUActivation).
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
}
config_choice!(Activation, "expected quick_gelu or gelu", { "quick_gelu" => Self::QuickGelu, "gelu" => Self::Gelu });

/// `mm_vision_select_feature`: the release's `feature_select` raises for anything but `patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SelectFeature {
    /// The patch tokens, without CLS.
    Patch,
}
config_choice!(SelectFeature, "the release supports only `patch`", { "patch" => Self::Patch });

/// The model config's `image_aspect_ratio`, as the release's `process_images` branches on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Option<String>")]
pub enum AspectMode {
    /// `"pad"`: expand to a square filled with the mean color before the processor runs.
    Pad,
    /// Anything else (or no value): the processor runs on the image as it is.
    #[default]
    Plain,
}

impl TryFrom<Option<String>> for AspectMode {
    type Error = String;
    /// `"anyres"` is refused: its patch grid is not implemented.
    fn try_from(value: Option<String>) -> std::result::Result<Self, String> {
        match value.as_deref() {
            Some("pad") => Ok(Self::Pad),
            Some("anyres") => Err("\"anyres\" is not supported (only \"pad\" and plain resizing are)".into()),
            _ => Ok(Self::Plain),
        }
    }
}

impl AspectMode {
    /// The mode a config value names (what reading `config.json` does).
    pub fn from_image_aspect_ratio(value: Option<&str>) -> Result<Self> {
        Self::try_from(value.map(str::to_string))
            .map_err(|message| Error::InvalidInput(format!("image_aspect_ratio {message}")))
    }
}

/// The release's `config.json` (LlavaLlamaConfig = LlamaConfig + `mm_*` fields).
#[derive(Debug, Clone, Deserialize)]
pub struct ArcanaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: i64,
    /// Absent means no grouping (as many key/value heads as query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "defaults::bos_token_id")]
    pub bos_token_id: i64,
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    /// The decoder MLP's activation; the release's Llama uses `silu`.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: DecoderActivation,
    /// transformers' tensor-parallel emulation; only 1 (the release's value) is supported.
    #[serde(default = "defaults::pretraining_tp")]
    pub pretraining_tp: i64,
    #[serde(default = "defaults::mm_hidden_size")]
    pub mm_hidden_size: i64,
    /// The release's projector builder defaults to `linear`.
    #[serde(default = "defaults::mm_projector_type")]
    pub mm_projector_type: ProjectorKind,
    #[serde(default = "defaults::mm_vision_select_layer")]
    pub mm_vision_select_layer: i64,
    #[serde(default = "defaults::mm_vision_select_feature")]
    pub mm_vision_select_feature: SelectFeature,
    #[serde(default)]
    pub mm_vision_tower: Option<String>,
    /// Older uploads spell it `vision_tower`; the release reads either.
    #[serde(default)]
    pub vision_tower: Option<String>,
    #[serde(default)]
    pub image_aspect_ratio: AspectMode,
    #[serde(default)]
    pub mm_use_im_start_end: bool,
    #[serde(default)]
    pub mm_use_im_patch_token: bool,
    #[serde(default)]
    pub tokenizer_model_max_length: Option<i64>,
    /// Scaling of the MM-LoRA branches; the release hard-codes 2 for both.
    #[serde(default)]
    pub mm_lora_scaling: Option<f64>,
    /// Set by `arcana-convert --merge-lora`: the base weights already hold the language branch
    /// (`W + s * L_B @ L_A`), which the model then subtracts at visual positions.
    #[serde(default)]
    pub mm_lora_language_merged: bool,
}

/// Which projector maps vision features to the language model's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ProjectorKind {
    Linear,
    /// `mlpNx_gelu`: N linear layers with exact GELU between them.
    MlpGelu(usize),
    Identity,
}

impl ProjectorKind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "linear" => Some(Self::Linear),
            "identity" => Some(Self::Identity),
            _ => {
                let depth = name.strip_prefix("mlp")?.strip_suffix("x_gelu")?;
                if depth.is_empty() || !depth.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // `mlp0x_gelu` matches the release's regex and builds one Linear, like `mlp1x_gelu`.
                depth.parse().ok().map(Self::MlpGelu)
            }
        }
    }
}

impl TryFrom<String> for ProjectorKind {
    type Error = String;
    fn try_from(value: String) -> std::result::Result<Self, String> {
        Self::parse(&value)
            .ok_or_else(|| format!("unknown projector type `{value}` (expected linear, mlpNx_gelu or identity)"))
    }
}

impl ArcanaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    pub fn projector_kind(&self) -> ProjectorKind {
        self.mm_projector_type
    }

    /// The vision tower's name or path as the release reads it.
    pub fn vision_tower_name(&self) -> Option<&str> {
        self.mm_vision_tower.as_deref().or(self.vision_tower.as_deref())
    }

    pub fn lora_scaling(&self) -> f64 {
        self.mm_lora_scaling.unwrap_or(2.0)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| config_error(path, field, message);
        require_positive(
            path,
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.num_kv_heads()),
                ("max_position_embeddings", self.max_position_embeddings),
                ("vocab_size", self.vocab_size),
                ("mm_hidden_size", self.mm_hidden_size),
            ],
        )?;
        // Zero decoder layers is allowed: vision-only test checkpoints have none.
        if self.num_hidden_layers < 0 {
            return Err(bad("num_hidden_layers", format!("must not be negative, got {}", self.num_hidden_layers)));
        }
        require_whole_heads(path, self.hidden_size, self.num_attention_heads)?;
        if self.head_dim() % 2 != 0 {
            return Err(bad(
                "num_attention_heads",
                format!("head size {} must be even for rotary embeddings", self.head_dim()),
            ));
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(bad("rms_norm_eps", format!("must be positive, got {}", self.rms_norm_eps)));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(bad("rope_theta", format!("must be positive, got {}", self.rope_theta)));
        }
        if let Some(scaling) = &self.rope_scaling {
            if scaling.factor.is_nan() || scaling.factor <= 1.0 {
                return Err(bad("rope_scaling", format!("factor must be > 1, got {}", scaling.factor)));
            }
        }
        if self.pretraining_tp != 1 {
            return Err(bad("pretraining_tp", format!("only 1 is supported, got {}", self.pretraining_tp)));
        }
        if self.projector_kind() == ProjectorKind::Identity && self.mm_hidden_size != self.hidden_size {
            return Err(bad(
                "mm_projector_type",
                format!(
                    "identity projector needs mm_hidden_size ({}) == hidden_size ({})",
                    self.mm_hidden_size, self.hidden_size
                ),
            ));
        }
        Ok(())
    }
}

/// transformers' CLIPVisionConfig.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct VisionConfig {
    #[serde(default = "defaults::clip_hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "defaults::clip_intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "defaults::clip_num_hidden_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "defaults::clip_num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "defaults::clip_num_channels")]
    pub num_channels: i64,
    #[serde(default = "defaults::clip_image_size")]
    pub image_size: i64,
    #[serde(default = "defaults::clip_patch_size")]
    pub patch_size: i64,
    #[serde(default = "defaults::clip_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::clip_hidden_act")]
    pub hidden_act: Activation,
}

/// A CLIP config file is either a CLIPVisionConfig or a full CLIPConfig holding one.
#[derive(Deserialize)]
struct ClipConfigFile {
    #[serde(default)]
    vision_config: Option<serde_json::Value>,
}

impl VisionConfig {
    /// Reads a vision tower folder's `config.json` (CLIPVisionConfig or CLIPConfig).
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        let wrapper: ClipConfigFile = parse_json_value(path, value.clone())?;
        let config: Self = match wrapper.vision_config {
            Some(vision) => parse_json_value(path, vision)?,
            None => parse_json_value(path, value)?,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// The config of `openai/clip-vit-large-patch14-336`, the release's vision tower.
    pub fn clip_vit_large_patch14_336() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        }
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    pub fn num_patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| config_error(path, field, message);
        require_positive(
            path,
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_channels", self.num_channels),
                ("image_size", self.image_size),
                ("patch_size", self.patch_size),
            ],
        )?;
        require_whole_heads(path, self.hidden_size, self.num_attention_heads)?;
        if self.image_size % self.patch_size != 0 {
            return Err(bad(
                "patch_size",
                format!("image_size {} is not divisible by patch_size {}", self.image_size, self.patch_size),
            ));
        }
        Ok(())
    }
}

/// Where the vision tower's config and (fallback) weights come from.
#[derive(Debug, Clone)]
pub enum VisionTowerSource {
    /// A folder with config.json, preprocessor_config.json and weights.
    Folder(PathBuf),
    /// A known hub id whose config is embedded; its weights must be in the main checkpoint.
    Embedded(String),
}

/// Resolves `mm_vision_tower` like the release (a path, or a hub id), also trying the name relative to
/// the model folder so that a self-contained checkpoint folder can be moved as a whole, and then a
/// folder of the path's final name inside the model folder: configs saved on a training machine
/// carry its absolute paths (`/home/x/clip-vit-large-patch14-336-qladder`).
pub fn resolve_vision_tower(model_dir: &Path, name: &str) -> Result<VisionTowerSource> {
    let as_given = PathBuf::from(name);
    let mut candidates = vec![model_dir.join(name)];
    if !candidates.contains(&as_given) {
        candidates.push(as_given.clone());
    }
    let as_written = candidates.len();
    let same_name_inside = as_given.file_name().map(|last| model_dir.join(last));
    if let Some(inside) = same_name_inside.filter(|p| !candidates.contains(p)) {
        candidates.push(inside);
    }
    if let Some(position) = candidates.iter().position(|p| p.join("config.json").is_file()) {
        let folder = candidates[position].clone();
        if position >= as_written {
            eprintln!("mm_vision_tower `{name}` does not exist; using {} from the model folder", folder.display());
        }
        return Ok(VisionTowerSource::Folder(folder));
    }
    if name == CLIP_VIT_L_336 {
        return Ok(VisionTowerSource::Embedded(name.to_string()));
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(Error::Config {
        path: model_dir.join("config.json"),
        field: "mm_vision_tower".into(),
        message: format!(
            "vision tower `{name}` is neither a folder with a config.json (tried {}) nor the known hub id {CLIP_VIT_L_336}",
            tried.join(", ")
        ),
    })
}

/// An error about `field` of the config file at `path`.
pub(crate) fn config_error(path: &Path, field: &str, message: impl Into<String>) -> Error {
    Error::Config { path: path.to_path_buf(), field: field.to_string(), message: message.into() }
}

fn require_positive(path: &Path, fields: &[(&str, i64)]) -> Result<()> {
    match fields.iter().find(|(_, value)| *value <= 0) {
        Some((field, value)) => Err(config_error(path, field, format!("must be positive, got {value}"))),
        None => Ok(()),
    }
}

/// Attention heads must split the hidden size evenly.
fn require_whole_heads(path: &Path, hidden_size: i64, num_heads: i64) -> Result<()> {
    if hidden_size % num_heads != 0 {
        return Err(config_error(
            path,
            "num_attention_heads",
            format!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"),
        ));
    }
    Ok(())
}

/// Reads a JSON file into `T`; errors name the file and, for a field of the wrong type, the field.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    parse_json_value(path, value)
}

/// A JSON file holding one object, or `None` when there is no such file.
pub fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    match read_json(path)? {
        serde_json::Value::Object(map) => Ok(Some(map)),
        _ => Err(config_error(path, "<root>", "expected a JSON object")),
    }
}

/// Deserializes with the failing field's path in the error (serde_path_to_error).
fn parse_json_value<T: DeserializeOwned>(path: &Path, value: serde_json::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

mod defaults {
    pub fn hidden_size() -> i64 {
        4096
    }
    pub fn intermediate_size() -> i64 {
        11008
    }
    pub fn num_attention_heads() -> i64 {
        32
    }
    pub fn num_hidden_layers() -> i64 {
        32
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn hidden_act() -> super::DecoderActivation {
        super::DecoderActivation::Silu
    }
    pub fn pretraining_tp() -> i64 {
        1
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn max_position_embeddings() -> i64 {
        2048
    }
    pub fn vocab_size() -> i64 {
        32000
    }
    pub fn bos_token_id() -> i64 {
        1
    }
    pub fn eos_token_id() -> i64 {
        2
    }
    pub fn mm_hidden_size() -> i64 {
        1024
    }
    pub fn mm_projector_type() -> super::ProjectorKind {
        super::ProjectorKind::Linear
    }
    pub fn mm_vision_select_layer() -> i64 {
        -2
    }
    pub fn mm_vision_select_feature() -> super::SelectFeature {
        super::SelectFeature::Patch
    }
    pub fn clip_hidden_size() -> i64 {
        768
    }
    pub fn clip_intermediate_size() -> i64 {
        3072
    }
    pub fn clip_num_hidden_layers() -> i64 {
        12
    }
    pub fn clip_num_attention_heads() -> i64 {
        12
    }
    pub fn clip_num_channels() -> i64 {
        3
    }
    pub fn clip_image_size() -> i64 {
        224
    }
    pub fn clip_patch_size() -> i64 {
        32
    }
    pub fn clip_layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn clip_hidden_act() -> super::Activation {
        super::Activation::QuickGelu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projector_names_parse_like_the_release_regex() {
        assert_eq!(ProjectorKind::parse("linear"), Some(ProjectorKind::Linear));
        assert_eq!(ProjectorKind::parse("mlp2x_gelu"), Some(ProjectorKind::MlpGelu(2)));
        assert_eq!(ProjectorKind::parse("mlp12x_gelu"), Some(ProjectorKind::MlpGelu(12)));
        assert_eq!(ProjectorKind::parse("identity"), Some(ProjectorKind::Identity));
        assert_eq!(ProjectorKind::parse("mlpx_gelu"), None);
        assert_eq!(ProjectorKind::parse("mlp2x_relu"), None);
        assert_eq!(ProjectorKind::parse("mlp-1x_gelu"), None);
    }
}
