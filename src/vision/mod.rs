//! Vision side: CLIP vision transformer, Query Ladder adapter and image preprocessing.
pub mod clip;
pub mod decode;
mod jpeg;
pub mod preprocess;
pub mod qladder;
pub mod resample;
pub mod tower;

pub use tower::{VisionOutputs, VisionTower};

/// Whether `name` (a vision tower tensor, without the main checkpoint's prefix) is the weight of one of
/// the linear layers that `LinearStorage` governs: the attention projections of CLIP's layers and of
/// the ladder's cross-attention, and their MLPs' `fc1` / `fc2` (see `ClipAttention::load`, `ClipMlp::load`).
pub fn is_governed_linear_weight(name: &str) -> bool {
    const ATTENTION: [&str; 2] = ["self_attn", "cross_attn"];
    const PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];
    let Some(module) = name.strip_suffix(".weight") else { return false };
    let mut parts = module.rsplit('.');
    let (Some(leaf), Some(parent)) = (parts.next(), parts.next()) else { return false };
    let in_layer = name.starts_with("vision_model.encoder.layers.") || name.starts_with("LadderAdapters.");
    in_layer
        && ((ATTENTION.contains(&parent) && PROJECTIONS.contains(&leaf))
            || (parent == "mlp" && matches!(leaf, "fc1" | "fc2")))
}
