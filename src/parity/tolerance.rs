//! What counts as agreeing with a reference.
//!
//! A reference exported on the same machine, kernel path and libtorch must be matched bit for bit. A
//! reference made elsewhere (the committed fixtures) is matched within per-stage bounds measured across
//! kernel paths by `parity/kernel_drift.py` and stored in `tests/fixtures/parity/tolerances.json`.
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Bounds for one stage's float tensors: `max|diff| / max|reference| <= max_rel` and
/// `cosine >= min_cosine`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct StageBound {
    pub max_rel: f64,
    pub min_cosine: f64,
}

/// Per-stage bounds keyed by stage (a tensor name without its trailing layer index: `llm.layers`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageBounds {
    pub stages: BTreeMap<String, StageBound>,
}

impl StageBounds {
    /// Reads a tolerances file written by `parity/kernel_drift.py --write-tolerances`.
    pub fn load(path: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct File {
            stages: BTreeMap<String, StageBound>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let file: File = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("{}: not a tolerances file: {e}", path.display())))?;
        for (stage, bound) in &file.stages {
            if !(bound.max_rel >= 0.0 && bound.min_cosine <= 1.0) {
                return Err(Error::InvalidInput(format!(
                    "{}: stage `{stage}` has an impossible bound {bound:?}",
                    path.display()
                )));
            }
        }
        Ok(Self { stages: file.stages })
    }

    /// The bound for a tensor, by its stage; `None`: the tensor must be bit-identical.
    pub fn for_tensor(&self, name: &str) -> Option<&StageBound> {
        self.stages.get(stage_of(name))
    }
}

/// `llm.layers.3` -> `llm.layers`; names without a trailing index are their own stage.
pub fn stage_of(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((head, tail)) if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => name,
    }
}

/// How a tensor must agree with its reference.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Tolerance {
    /// Same bits, same dtype: for references exported on this machine and kernel path.
    #[default]
    BitIdentical,
    /// max |diff| at most this.
    MaxAbs(f64),
    /// Float tensors within their stage's bounds, everything else (ids, masks, unlisted stages) exact:
    /// for references made on another machine.
    Stages(StageBounds),
    /// Float tensors with at least this cosine similarity, everything else exact: for GPU runs, where
    /// cuBLAS may choose other kernels than PyTorch did.
    MinCosine(f64),
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tolerance::BitIdentical => write!(f, "bit-identical required"),
            Tolerance::MaxAbs(m) => write!(f, "max|diff| <= {m:e}"),
            Tolerance::Stages(b) => write!(f, "per-stage bounds for {} stages, ids exact", b.stages.len()),
            Tolerance::MinCosine(c) => write!(f, "float tensors cosine >= {c}, ids exact"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_drop_only_a_trailing_index() {
        assert_eq!(stage_of("llm.layers.12"), "llm.layers");
        assert_eq!(stage_of("vision.hidden_states.0"), "vision.hidden_states");
        assert_eq!(stage_of("logits"), "logits");
        assert_eq!(stage_of("projector.out"), "projector.out");
        assert_eq!(stage_of("llm.layers."), "llm.layers.");
    }
}
