//! Layer-by-layer comparison with tensors that a PyTorch reference run exported (`parity/export.py`).
//!
//! A reference file is a safetensors file: `input.*` tensors are what the model is fed, every other
//! tensor is an intermediate the Rust model must reproduce under the same name.
mod machine;
mod tolerance;

pub use machine::{describe as describe_machine, kernel_path_differences, this_machine};
pub use tolerance::{stage_of, StageBound, StageBounds, Tolerance};

use crate::error::{Error, Result};
use crate::llm::llama::DecoderSites;
use crate::llm::placement::LayerMap;
use crate::mm::visual_span::MaskPolicy;
use crate::model::{ArcanaModel, ModelFiles, VisionSide};
use crate::quant::WeightForms;
use crate::weights::TensorFile;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub const INPUT_PIXEL_VALUES: &str = "input.pixel_values";
pub const INPUT_INPUT_IDS: &str = "input.input_ids";
pub const INPUT_ATTENTION_MASK: &str = "input.attention_mask";
pub const GREEDY_IDS: &str = "greedy.ids";

/// How one tensor compares with its reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: String,
    /// max |ours - reference|
    pub max_abs_diff: f64,
    /// max |ours - reference| / max |reference| (0 when the reference is all zeros and the tensors agree).
    pub max_rel_diff: f64,
    /// Cosine similarity of the flattened tensors, computed in float64.
    pub cosine: f64,
    pub bit_identical: bool,
    pub status: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    OverTolerance,
    /// The reference has the tensor, the Rust model produced none.
    Missing,
    ShapeMismatch,
}

fn missing_report(name: &str, reference: &Tensor) -> TensorReport {
    TensorReport {
        name: name.to_string(),
        shape: reference.size(),
        dtype: format!("{:?}", reference.kind()),
        max_abs_diff: f64::NAN,
        max_rel_diff: f64::NAN,
        cosine: f64::NAN,
        bit_identical: false,
        status: Status::Missing,
    }
}

/// Compares `ours` with `reference` (moved to CPU; statistics in float64).
pub fn compare(name: &str, ours: &Tensor, reference: &Tensor, tolerance: &Tolerance) -> Result<TensorReport> {
    let ours = ours.f_to_device(Device::Cpu)?;
    let reference = reference.f_to_device(Device::Cpu)?;
    let mut report = missing_report(name, &reference);
    report.shape = ours.size();
    report.dtype = format!("{:?}", ours.kind());
    if ours.size() != reference.size() {
        report.status = Status::ShapeMismatch;
        return Ok(report);
    }
    report.bit_identical = ours.kind() == reference.kind() && ours.f_equal(&reference)?;
    let a = ours.f_to_kind(Kind::Double)?;
    let b = reference.f_to_kind(Kind::Double)?;
    report.max_abs_diff = if a.numel() == 0 { 0.0 } else { a.f_sub(&b)?.f_abs()?.f_max()?.f_double_value(&[])? };
    let ref_max = if b.numel() == 0 { 0.0 } else { b.f_abs()?.f_max()?.f_double_value(&[])? };
    report.max_rel_diff = if ref_max > 0.0 {
        report.max_abs_diff / ref_max
    } else if report.max_abs_diff == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let dot = a.f_mul(&b)?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let norms = a.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?.sqrt()
        * b.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?.sqrt();
    report.cosine = if norms > 0.0 {
        dot / norms
    } else if report.bit_identical {
        1.0
    } else {
        0.0
    };
    let floats = ours.is_floating_point() && reference.is_floating_point();
    let within = report.bit_identical
        || match tolerance {
            Tolerance::BitIdentical => false,
            Tolerance::MaxAbs(max_abs) => report.max_abs_diff <= *max_abs,
            Tolerance::Stages(bounds) => match bounds.for_tensor(name) {
                Some(bound) if floats => report.max_rel_diff <= bound.max_rel && report.cosine >= bound.min_cosine,
                _ => false,
            },
            Tolerance::MinCosine(min) => floats && report.cosine >= *min,
        };
    report.status = if within { Status::Ok } else { Status::OverTolerance };
    Ok(report)
}

/// An exported reference file.
pub struct Reference {
    file: TensorFile,
}

impl Reference {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { file: TensorFile::open(path)? })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.file.shape(name).is_some()
    }

    /// Where the reference was computed (`machine.*` metadata; empty for files that predate it).
    pub fn machine(&self) -> std::collections::BTreeMap<String, String> {
        machine::recorded(self.file.metadata())
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.file.load_as_stored(name, Device::Cpu)
    }

    /// The tensors the model must reproduce (everything but `input.*`).
    pub fn expected_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.file.names().filter(|n| !n.starts_with("input.")).map(str::to_string).collect();
        names.sort_by_key(|n| stage_order(n));
        names
    }
}

/// Forward order of the exported names, so reports read top to bottom and the first failure is the earliest.
fn stage_order(name: &str) -> (usize, i64, String) {
    const STAGES: [&str; 10] = [
        "vision.hidden_states.",
        "qladder.",
        "vision.features",
        "projector.out",
        "splice.",
        "inputs_embeds",
        "llm.layers.",
        "llm.norm",
        "logits",
        "greedy.",
    ];
    let stage = STAGES.iter().position(|s| name.starts_with(s)).unwrap_or(STAGES.len());
    let index = name.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(-1);
    (stage, index, name.to_string())
}

/// Runs the vision side on the reference's pixels and names its outputs like the exporter does.
pub fn vision_tensors(side: &VisionSide, pixel_values: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let encoded = side.encode(pixel_values)?;
    let mut out = Vec::new();
    for (i, t) in encoded.vision.hidden_states.iter().enumerate() {
        out.push((format!("vision.hidden_states.{i}"), t.shallow_clone()));
    }
    for (i, t) in encoded.vision.ladder_hidden_states.iter().enumerate() {
        out.push((format!("qladder.{i}"), t.shallow_clone()));
    }
    out.push(("vision.features".into(), encoded.vision.features));
    out.push(("projector.out".into(), encoded.projected));
    Ok(out)
}

/// The language side on a reference's inputs, named like the exporter: the splice, the prefill as the
/// release's `forward` (positions `0..L-1` in every row, the release's visual mask, the spliced padding
/// mask), and greedy ids as its `generate` with as many new tokens as the reference holds.
pub fn language_tensors(model: &ArcanaModel, reference: &Reference) -> Result<Vec<(String, Tensor)>> {
    let input_ids = reference.tensor(INPUT_INPUT_IDS)?;
    let mask =
        if reference.contains(INPUT_ATTENTION_MASK) { Some(reference.tensor(INPUT_ATTENTION_MASK)?) } else { None };
    let pixels =
        if reference.contains(INPUT_PIXEL_VALUES) { Some(reference.tensor(INPUT_PIXEL_VALUES)?) } else { None };
    let mut out = match &pixels {
        Some(p) => {
            // Cast as the release's CLI casts the pixels for the model (a no-op on CPU fp32).
            let (kind, device) = model.kind_and_device();
            vision_tensors(&model.vision, &p.f_to_kind(kind)?.f_to_device(device)?)?
        }
        None => Vec::new(),
    };
    let inputs = model.prepare_inputs(&input_ids, mask.as_ref(), pixels.as_ref())?;
    let prefill = model.prefill(&inputs, MaskPolicy::Release, true)?;
    out.push(("splice.attention_mask".into(), inputs.attention_mask.shallow_clone()));
    out.push(("inputs_embeds".into(), inputs.inputs_embeds.shallow_clone()));
    for (i, t) in prefill.decoder.layers.iter().enumerate() {
        out.push((format!("llm.layers.{i}"), t.shallow_clone()));
    }
    out.push(("llm.norm".into(), prefill.decoder.hidden));
    out.push(("logits".into(), prefill.logits));
    if reference.contains(GREEDY_IDS) {
        let width = reference.tensor(GREEDY_IDS)?.size().get(1).copied().unwrap_or(1);
        let max_new = (width - 1).max(0) as usize;
        out.push((GREEDY_IDS.into(), model.generate_greedy(&inputs, MaskPolicy::Release, max_new)?));
    }
    Ok(out)
}

/// Where the Rust model runs for a comparison: dtype, device, and optionally a decoder split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOn {
    pub kind: Kind,
    pub device: Device,
    /// Decoder layers per device; the front and head follow the first and last layer.
    pub map: Option<LayerMap>,
}

impl Default for RunOn {
    fn default() -> Self {
        Self { kind: Kind::Float, device: Device::Cpu, map: None }
    }
}

/// Loads the model in `checkpoint` (fp32, CPU) and runs it on the reference's inputs: the named tensors
/// the reference expects. A reference with `input.input_ids` runs the whole model (every checkpoint
/// tensor must be used); one with only pixels runs the vision side.
pub fn outputs(checkpoint: &Path, reference: &Reference) -> Result<Vec<(String, Tensor)>> {
    outputs_on(checkpoint, reference, &RunOn::default())
}

/// `outputs` with the model loaded as `run` says.
pub fn outputs_on(checkpoint: &Path, reference: &Reference, run: &RunOn) -> Result<Vec<(String, Tensor)>> {
    if reference.contains(INPUT_INPUT_IDS) {
        let files = ModelFiles::open(checkpoint)?;
        let n = files.config.num_hidden_layers as usize;
        let sites = match &run.map {
            Some(map) => DecoderSites::from_plan(&map.plan(n)?, run.kind),
            None => DecoderSites::single(run.kind, run.device, n),
        };
        let model = ArcanaModel::load_on(files, &sites, WeightForms::default(), |_, _| {})?;
        return language_tensors(&model, reference);
    }
    if !reference.contains(INPUT_PIXEL_VALUES) {
        return Err(Error::InvalidInput(format!(
            "{}: no `{INPUT_PIXEL_VALUES}` or `{INPUT_INPUT_IDS}` tensor to feed the model",
            reference.path().display()
        )));
    }
    let (_, side) = VisionSide::load_standalone(checkpoint, run.kind, run.device)?;
    // Cast as the release's CLI casts the pixels for the model.
    let pixels = reference.tensor(INPUT_PIXEL_VALUES)?.f_to_kind(run.kind)?.f_to_device(run.device)?;
    vision_tensors(&side, &pixels)
}

/// Runs `checkpoint` on the reference's inputs and compares every expected tensor, in forward order.
pub fn check(checkpoint: &Path, reference: &Path, tolerance: &Tolerance) -> Result<Vec<TensorReport>> {
    check_on(checkpoint, reference, tolerance, &RunOn::default())
}

/// `check` with the model loaded as `run` says.
pub fn check_on(checkpoint: &Path, reference: &Path, tolerance: &Tolerance, run: &RunOn) -> Result<Vec<TensorReport>> {
    let reference = Reference::open(reference)?;
    let ours = outputs_on(checkpoint, &reference, run)?;
    let mut reports = Vec::new();
    for name in reference.expected_names() {
        let expected = reference.tensor(&name)?;
        let report = match ours.iter().find(|(n, _)| *n == name) {
            Some((_, tensor)) => compare(&name, tensor, &expected, tolerance)?,
            None => missing_report(&name, &expected),
        };
        reports.push(report);
    }
    Ok(reports)
}

/// The first tensor, in forward order, that is not within tolerance.
pub fn first_failure(reports: &[TensorReport]) -> Option<&TensorReport> {
    reports.iter().find(|r| r.status != Status::Ok)
}
