//! The release's vision tower (`clip_encoder_qladder.py`): CLIP + Query Ladder and the feature selection.
use crate::config::{ArcanaConfig, VisionConfig};
use crate::error::{Error, Result};
use crate::quant::{BaseWeight, LinearStorage};
use crate::vision::clip::ClipVisionTransformer;
use crate::vision::qladder::QueryLadder;
use crate::weights::Weights;
use std::path::Path;
use tch::{Kind, Tensor};

/// Everything one forward of the tower computes, for parity checks and callers that want the layers.
pub struct VisionOutputs {
    /// CLIP `hidden_states` (L + 1 entries).
    pub hidden_states: Vec<Tensor>,
    /// `ladder_hidden_states` (L entries).
    pub ladder_hidden_states: Vec<Tensor>,
    /// `cat([hidden_states[s][:, 1:], ladder_hidden_states[s]], 1)`: [batch, patches + queries, hidden].
    pub features: Tensor,
}

#[derive(Debug)]
pub struct VisionTower {
    pub vision_model: ClipVisionTransformer,
    pub ladder: QueryLadder,
    pub config: VisionConfig,
    /// `mm_vision_select_layer` resolved at load: the entry of CLIP's hidden states (embeddings + one
    /// per layer) and of the ladder's outputs (one per layer) that the features take.
    selected: (usize, usize),
}

/// Resolves a Python index into a sequence of `len` items.
fn python_index(index: i64, len: usize) -> Option<usize> {
    let len = len as i64;
    let resolved = if index < 0 { index + len } else { index };
    (0..len).contains(&resolved).then_some(resolved as usize)
}

impl VisionTower {
    /// `w` points at `model.vision_tower.vision_tower`; `config_path` names the file for error messages.
    pub fn load(
        w: &Weights,
        config: &VisionConfig,
        model: &ArcanaConfig,
        config_path: &Path,
        linears: LinearStorage,
    ) -> Result<Self> {
        let layers = config.num_hidden_layers as usize;
        // The index must be valid for both CLIP's L + 1 hidden states and the ladder's L outputs.
        let select = model.mm_vision_select_layer;
        let Some(selected) = python_index(select, layers + 1).zip(python_index(select, layers)) else {
            return Err(Error::Config {
                path: config_path.to_path_buf(),
                field: "mm_vision_select_layer".into(),
                message: format!(
                    "{} is out of range for a vision tower of {layers} layers (valid: -{layers} to {})",
                    model.mm_vision_select_layer,
                    layers as i64 - 1
                ),
            });
        };
        if model.mm_hidden_size != config.hidden_size {
            return Err(Error::Config {
                path: config_path.to_path_buf(),
                field: "mm_hidden_size".into(),
                message: format!(
                    "{} differs from the vision tower's hidden_size {}",
                    model.mm_hidden_size, config.hidden_size
                ),
            });
        }
        Ok(Self {
            vision_model: ClipVisionTransformer::load(&w.pp("vision_model"), config, linears)?,
            ladder: QueryLadder::load(w, config, linears)?,
            config: config.clone(),
            selected,
        })
    }

    /// Every linear layer of CLIP and the ladder, in their stored forms.
    pub fn linears(&self) -> impl Iterator<Item = &BaseWeight> {
        let clip = self.vision_model.layers.iter().map(|l| (&l.self_attn, &l.mlp));
        let ladder = self.ladder.layers.iter().map(|l| (&l.cross_attn, &l.mlp));
        clip.chain(ladder).flat_map(|(attention, mlp)| attention.linears().into_iter().chain([&mlp.fc1, &mlp.fc2]))
    }

    /// Visual tokens per image: patches plus ladder queries (576 + 64 for the release).
    pub fn tokens_per_image(&self) -> i64 {
        self.config.num_patches() + self.ladder.num_queries()
    }

    /// Runs CLIP and the ladder on `[batch, 3, H, W]` pixels; features come back in the pixels' dtype.
    /// Every CLIP and ladder layer's output and the features, as the parity harness compares them.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionOutputs> {
        self.check_pixels(pixel_values)?;
        let hidden_states = self.vision_model.hidden_states(pixel_values)?;
        let ladder_hidden_states = self.ladder.forward(&hidden_states)?;
        let features = self.features_from(&hidden_states, &ladder_hidden_states, pixel_values.kind())?;
        Ok(VisionOutputs { hidden_states, ladder_hidden_states, features })
    }

    /// The features alone: CLIP and ladder layers after the selected one are not run, as nothing reads
    /// them (the same values as `forward(..).features`, bit for bit).
    pub fn features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.features_in_stages(pixel_values, || {})
    }

    /// `features`, calling `after_clip` once CLIP's layers have run and before the ladder's.
    pub fn features_in_stages(&self, pixel_values: &Tensor, after_clip: impl FnOnce()) -> Result<Tensor> {
        self.check_pixels(pixel_values)?;
        let (clip_index, ladder_index) = self.selected;
        // Ladder layer i reads CLIP's hidden_states[i], so the ladder never needs more CLIP layers.
        let hidden_states = self.vision_model.hidden_states_upto(pixel_values, clip_index.max(ladder_index))?;
        after_clip();
        let ladder_hidden_states = self.ladder.forward_upto(&hidden_states, ladder_index + 1)?;
        self.features_from(&hidden_states, &ladder_hidden_states, pixel_values.kind())
    }

    fn features_from(&self, hidden_states: &[Tensor], ladder_hidden_states: &[Tensor], kind: Kind) -> Result<Tensor> {
        let (clip_index, ladder_index) = self.selected;
        let clip = &hidden_states[clip_index];
        let ladder = &ladder_hidden_states[ladder_index];
        let patches = clip.f_narrow(1, 1, clip.size()[1] - 1)?;
        Ok(Tensor::f_cat(&[&patches, ladder], 1)?.f_to_kind(kind)?)
    }

    fn check_pixels(&self, pixel_values: &Tensor) -> Result<()> {
        let size = pixel_values.size();
        let expected = [self.config.num_channels, self.config.image_size, self.config.image_size];
        if size.len() != 4 || size[1..] != expected {
            return Err(Error::InvalidInput(format!(
                "pixel_values must be [batch, {}, {}, {}], got {size:?}",
                expected[0], expected[1], expected[2]
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::python_index;

    #[test]
    fn python_indices_resolve_like_python() {
        assert_eq!(python_index(-2, 5), Some(3));
        assert_eq!(python_index(-1, 4), Some(3));
        assert_eq!(python_index(0, 4), Some(0));
        assert_eq!(python_index(4, 4), None);
        assert_eq!(python_index(-5, 4), None);
    }
}
