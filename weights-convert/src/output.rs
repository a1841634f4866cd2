//! Writes tensors into safetensors shards one at a time, hashing each, and records a manifest.
use crate::source::SourceTensor;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::Kind;

pub const MANIFEST: &str = "arcana-manifest.json";

/// Output dtypes the tool writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    Fp32,
    Fp16,
    Bf16,
}

impl OutDtype {
    pub fn kind(self) -> Kind {
        match self {
            Self::Fp32 => Kind::Float,
            Self::Fp16 => Kind::Half,
            Self::Bf16 => Kind::BFloat16,
        }
    }
    pub fn dtype(self) -> Dtype {
        match self {
            Self::Fp32 => Dtype::F32,
            Self::Fp16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::Fp32 => "float32",
            Self::Fp16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: String,
    pub file: String,
    pub sha256: String,
}

pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

fn element_size(dtype: Dtype) -> usize {
    dtype.size()
}

/// The dtype a tensor is written in: floating point tensors take the chosen dtype, others keep theirs.
pub fn output_dtype(tensor: &SourceTensor, out: OutDtype) -> Dtype {
    if is_float(tensor.dtype) {
        out.dtype()
    } else {
        tensor.dtype
    }
}

/// The source tensor converted to what is written, as a contiguous CPU tensor.
pub fn converted(tensor: &SourceTensor, out: OutDtype) -> Result<tch::Tensor> {
    let loaded = tensor.load()?;
    let target = if is_float(tensor.dtype) { out.kind() } else { loaded.kind() };
    Ok(loaded.f_to_kind(target)?.f_contiguous()?)
}

fn tensor_bytes(t: &tch::Tensor) -> Result<Vec<u8>> {
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(bytes)
}

/// A tensor to be written: its dtype and shape, known before any data is read, and the file it comes
/// from (for messages).
pub struct Planned {
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    pub from: PathBuf,
}

impl Planned {
    fn bytes(&self) -> u64 {
        self.shape.iter().product::<i64>() as u64 * element_size(self.dtype) as u64
    }
}

/// What a conversion writes: every output tensor by name, and how to compute each one.
pub trait Outputs {
    fn planned(&self) -> &BTreeMap<String, Planned>;
    /// The tensor `name` as written: contiguous, on the CPU, of its planned dtype and shape.
    fn produce(&self, name: &str) -> Result<tch::Tensor>;
}

/// Every source tensor in one output dtype (floating point ones; others keep theirs).
pub struct Converted<'a> {
    tensors: &'a BTreeMap<String, SourceTensor>,
    out: OutDtype,
    planned: BTreeMap<String, Planned>,
}

impl<'a> Converted<'a> {
    pub fn new(tensors: &'a BTreeMap<String, SourceTensor>, out: OutDtype) -> Self {
        let planned = tensors
            .iter()
            .map(|(name, t)| {
                (name.clone(), Planned { dtype: output_dtype(t, out), shape: t.shape.clone(), from: t.file.clone() })
            })
            .collect();
        Self { tensors, out, planned }
    }
}

impl Outputs for Converted<'_> {
    fn planned(&self) -> &BTreeMap<String, Planned> {
        &self.planned
    }

    fn produce(&self, name: &str) -> Result<tch::Tensor> {
        converted(&self.tensors[name], self.out)
    }
}

/// Assigns tensors to shards of at most `max_shard_bytes` (a tensor larger than that gets its own).
fn plan_shards(planned: &BTreeMap<String, Planned>, max_shard_bytes: u64) -> Vec<Vec<(&String, &Planned)>> {
    let mut shards: Vec<Vec<_>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, tensor) in planned {
        let bytes = tensor.bytes();
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("non-empty").push((name, tensor));
        size += bytes;
    }
    shards
}

/// Writes every output tensor into `dir`, returning the manifest and the files written. Checks `stop`
/// between tensors.
pub fn write_shards(
    dir: &Path,
    outputs: &dyn Outputs,
    max_shard_bytes: u64,
    stop: &AtomicBool,
) -> Result<(Vec<ManifestEntry>, Vec<PathBuf>)> {
    let planned = outputs.planned();
    let shards = plan_shards(planned, max_shard_bytes);
    let total: u64 = planned.values().map(Planned::bytes).sum();
    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}")
            .expect("valid template"),
    );
    let mut manifest = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    let count = shards.len();
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let path = dir.join(&file_name);
        // Header first: offsets follow from shapes and output dtypes, known before any data is read.
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0usize;
        for (name, tensor) in shard {
            let bytes = tensor.bytes() as usize;
            header.insert(
                (*name).clone(),
                serde_json::json!({"dtype": format!("{:?}", tensor.dtype), "shape": tensor.shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        // The data starts on a 64-byte boundary, so tensors whose sizes are multiples of 64 bytes (all of
        // them at the released shapes) are as aligned in the mapping as libtorch's own allocations and
        // load in place (`arcana::weights::TENSOR_ALIGNMENT`).
        let mut header_bytes = serde_json::to_vec(&header)?;
        while (8 + header_bytes.len()) % arcana::weights::TENSOR_ALIGNMENT != 0 {
            header_bytes.push(b' ');
        }
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = BufWriter::with_capacity(1 << 22, file);
        writer.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        writer.write_all(&header_bytes)?;
        for (name, tensor) in shard {
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            progress.set_message((*name).clone());
            let data = tensor_bytes(&outputs.produce(name).with_context(|| format!("tensor `{name}`"))?)?;
            if data.len() as u64 != tensor.bytes() {
                bail!(
                    "tensor `{name}` from {}: {} bytes where its shape needs {}",
                    tensor.from.display(),
                    data.len(),
                    tensor.bytes()
                );
            }
            writer.write_all(&data).with_context(|| format!("writing {}", path.display()))?;
            manifest.push(ManifestEntry {
                name: (*name).clone(),
                shape: tensor.shape.clone(),
                dtype: format!("{:?}", tensor.dtype),
                file: file_name.clone(),
                sha256: hex(&Sha256::digest(&data)),
            });
            weight_map.insert((*name).clone(), file_name.clone());
            progress.inc(data.len() as u64);
        }
        writer.flush().with_context(|| format!("writing {}", path.display()))?;
        writer.get_ref().sync_all().with_context(|| format!("syncing {}", path.display()))?;
        files.push(path);
    }
    progress.finish_and_clear();
    if count > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)?;
    }
    Ok((manifest, files))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
