//! `--quantize`: the output plan of a pre-quantized folder (see `arcana::quant::prequantized`). Each
//! decoder projection's weight and lm_head become their compact parts, computed by the library's own
//! `CompactParts::of` from the weight in fp32 (merged first with `--merge-lora`, as the engine merges at
//! load), so that the folder holds exactly what quantizing at load holds in memory. The vision side's
//! governed linear weights are written in fp16 when the mode keeps them so, and so are the LoRA branches
//! that run at image positions only (`arcana::llm::mmlora::Branch::storage`), every other floating point
//! tensor in fp32, the CPU's compute dtype, so that the engine reads each one in place.
use crate::output::{is_float, Outputs, Planned};
use crate::source::SourceTensor;
use anyhow::{anyhow, bail, Result};
use arcana::llm::mmlora::Branch;
use arcana::model::VISION_TOWER_PREFIX;
use arcana::quant::{CompactParts, LinearStorage, Quantization};
use safetensors::Dtype;
use std::cell::RefCell;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

const LM_HEAD: &str = "lm_head";
const LM_HEAD_WEIGHT: &str = "lm_head.weight";
const EMBED_TOKENS: &str = "model.embed_tokens.weight";

enum Recipe {
    /// A source tensor converted to a dtype.
    As { source: String, kind: Kind },
    /// One part of the compact form of a source weight.
    Part { source: String, mode: Quantization, part: &'static str },
}

pub struct Quantized<'a> {
    tensors: &'a BTreeMap<String, SourceTensor>,
    planned: BTreeMap<String, Planned>,
    recipes: BTreeMap<String, Recipe>,
    int8_max_code: f64,
    /// The parts of the last weight quantized: its parts are written one after another.
    last: RefCell<Option<QuantizedWeight>>,
}

/// A source weight's name and its compact parts by name.
type QuantizedWeight = (String, Vec<(&'static str, Tensor)>);

fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        other => unreachable!("no compact part is {other:?}"),
    }
}

impl<'a> Quantized<'a> {
    /// The plan for `tensors` (already merged with `--merge-lora` where asked). `tied`: the config ties
    /// lm_head to the embeddings, so a checkpoint without `lm_head.weight` gets its parts from them.
    /// `language_merged`: the projections hold their language branch.
    pub fn new(
        tensors: &'a BTreeMap<String, SourceTensor>,
        mode: Quantization,
        vision: LinearStorage,
        int8_max_code: f64,
        tied: bool,
        language_merged: bool,
    ) -> Result<Self> {
        let mut plan = Self {
            tensors,
            planned: BTreeMap::new(),
            recipes: BTreeMap::new(),
            int8_max_code,
            last: RefCell::new(None),
        };
        let projection = |name: &str| {
            name.strip_suffix(".weight")
                .filter(|module| tensors.contains_key(&format!("{module}.V_Slora_A.weight")))
                .map(str::to_string)
        };
        for (name, tensor) in tensors {
            if name == LM_HEAD_WEIGHT {
                plan.add_parts(LM_HEAD, name, mode.for_lm_head())?;
            } else if let Some(module) = projection(name) {
                plan.add_parts(&module, name, mode)?;
            } else {
                let vision_linear =
                    name.strip_prefix(VISION_TOWER_PREFIX).is_some_and(arcana::vision::is_governed_linear_weight);
                // The LoRA branches that the engine keeps compact beside compact projections: in fp16
                // (the engine makes int8 codes from these values where it keeps them so).
                let lora_fp16 = Branch::of_weight(name)
                    .is_some_and(|branch| branch.storage(Some(mode), language_merged) != LinearStorage::Dense);
                let kind = match tensor.dtype {
                    _ if vision_linear && vision == LinearStorage::Fp16 => Some(Kind::Half),
                    _ if lora_fp16 => Some(Kind::Half),
                    dtype if is_float(dtype) => Some(Kind::Float),
                    _ => None,
                };
                let (dtype, kind) = match kind {
                    Some(kind) => (dtype_of(kind), kind),
                    None => (
                        tensor.dtype,
                        arcana::weights::stored_kind(tensor.dtype).ok_or_else(|| {
                            anyhow!("`{name}` in {}: dtype {:?} cannot be written", tensor.file.display(), tensor.dtype)
                        })?,
                    ),
                };
                plan.planned
                    .insert(name.clone(), Planned { dtype, shape: tensor.shape.clone(), from: tensor.file.clone() });
                plan.recipes.insert(name.clone(), Recipe::As { source: name.clone(), kind });
            }
        }
        if tied && !tensors.contains_key(LM_HEAD_WEIGHT) {
            if !tensors.contains_key(EMBED_TOKENS) {
                bail!("the config ties lm_head to `{EMBED_TOKENS}`, which the checkpoint lacks");
            }
            plan.add_parts(LM_HEAD, EMBED_TOKENS, mode.for_lm_head())?;
        }
        Ok(plan)
    }

    fn add_parts(&mut self, module: &str, source: &str, mode: Quantization) -> Result<()> {
        let tensor = &self.tensors[source];
        let [out_dim, in_dim] = tensor.shape[..] else {
            bail!(
                "`{source}` in {}: a weight of shape {:?}, expected 2 dimensions",
                tensor.file.display(),
                tensor.shape
            );
        };
        for (part, kind, shape) in CompactParts::names(mode, in_dim, out_dim)? {
            let name = format!("{module}.{part}");
            self.planned.insert(name.clone(), Planned { dtype: dtype_of(kind), shape, from: tensor.file.clone() });
            self.recipes.insert(name, Recipe::Part { source: source.to_string(), mode, part });
        }
        Ok(())
    }
}

impl Outputs for Quantized<'_> {
    fn planned(&self) -> &BTreeMap<String, Planned> {
        &self.planned
    }

    fn produce(&self, name: &str) -> Result<Tensor> {
        match &self.recipes[name] {
            Recipe::As { source, kind } => Ok(self.tensors[source].load()?.f_to_kind(*kind)?.f_contiguous()?),
            Recipe::Part { source, mode, part } => {
                let mut last = self.last.borrow_mut();
                if last.as_ref().is_none_or(|(done, _)| done != source) {
                    let weight = self.tensors[source].load()?;
                    let parts = CompactParts::of(&weight, *mode, self.int8_max_code)?.into_named();
                    *last = Some((source.clone(), parts));
                }
                let (_, parts) = last.as_ref().expect("set above");
                let (_, tensor) = parts.iter().find(|(p, _)| p == part).expect("every part is made");
                Ok(tensor.f_contiguous()?)
            }
        }
    }
}
