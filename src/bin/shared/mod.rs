//! Loading glue shared by the `arcana` and `arcana-serve` binaries: device names, weight and thread
//! flags, the default dtype per device, and `--model-base` assembly through `arcana-convert`.
use anyhow::{bail, Context, Result};
use arcana::llm::quant::Quantization;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// How the weights are kept and how many threads compute: the same flags on the CLI and the worker.
#[derive(clap::Args, Debug, Clone)]
pub struct WeightFlags {
    /// Weights dtype: fp32 (CPU default), fp16 (CUDA default) or bf16. On CPU, fp16 keeps the decoder's
    /// projections in fp16 and computes in fp32 (fbgemm), as libtorch has no fp16 matmul there.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// int8 decoder projections and lm_head (on CPU fbgemm's int8 GEMM; activations quantized per call).
    #[arg(long, conflicts_with = "load_4bit")]
    pub load_8bit: bool,
    /// int4 decoder projections (per-group scales), int8 lm_head.
    #[arg(long)]
    pub load_4bit: bool,
    /// Fold the MM-LoRA language branch into the base weights at load: the same function up to
    /// rounding, with no LoRA work at language positions (every decoded token).
    #[arg(long)]
    pub merge_lora: bool,
    /// Compute threads (default: the machine's physical cores; OMP_NUM_THREADS when set).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Copy, Clone, Debug, clap::ValueEnum)]
pub enum DtypeArg {
    Fp32,
    Fp16,
    Bf16,
}

/// What the weight flags resolve to on a device.
pub struct WeightChoice {
    /// The compute (and dense weights') dtype.
    pub kind: Kind,
    pub quantization: Option<Quantization>,
    pub merge_lora: bool,
}

impl WeightFlags {
    pub fn resolve(&self, device: Device) -> Result<WeightChoice> {
        let mut quantization = match (self.load_8bit, self.load_4bit) {
            (true, _) => Some(Quantization::Int8),
            (_, true) => Some(Quantization::Int4),
            _ => None,
        };
        let kind = match self.dtype {
            Some(DtypeArg::Fp32) => Kind::Float,
            Some(DtypeArg::Fp16) if device == Device::Cpu => {
                quantization.get_or_insert(Quantization::Fp16);
                Kind::Float
            }
            Some(DtypeArg::Fp16) => Kind::Half,
            Some(DtypeArg::Bf16) => Kind::BFloat16,
            None => default_kind(device),
        };
        Ok(WeightChoice { kind, quantization, merge_lora: self.merge_lora })
    }

    /// libtorch's intra-op threads for the engine: `--threads`, else none when OMP_NUM_THREADS is set
    /// (libtorch reads it itself), else the physical cores.
    pub fn threads(&self) -> Result<Option<usize>> {
        match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => Ok(Some(n)),
            None if std::env::var_os("OMP_NUM_THREADS").is_some() => Ok(None),
            None => Ok(Some(physical_cores())),
        }
    }
}

/// Distinct (package, core) pairs in /proc/cpuinfo; the logical CPUs where that is not readable.
fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else { return logical };
    let mut cores = std::collections::HashSet::new();
    let mut package = String::new();
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        match key.trim() {
            "physical id" => package = value.trim().to_string(),
            "core id" => {
                cores.insert((package.clone(), value.trim().to_string()));
            }
            _ => {}
        }
    }
    // A process limited to fewer CPUs (taskset, containers) gets no more threads than it may use.
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        "mps" => {
            bail!("--device mps: this build runs on libtorch for Linux, which has no MPS backend; use cpu or cuda")
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(index) = device {
        let count = tch::Cuda::device_count() as usize;
        if count == 0 {
            bail!("--device {name}: no CUDA device is available to this libtorch (found none)");
        }
        if index >= count {
            bail!("--device {name}: only {count} CUDA device(s) are available");
        }
    }
    Ok(device)
}

/// fp32 on CPU (libtorch 2.0.1 has no fp16 matmul there), fp16 on GPUs as the release loads.
pub fn default_kind(device: Device) -> Kind {
    if device == Device::Cpu {
        Kind::Float
    } else {
        Kind::Half
    }
}

/// The folder to load: `model_path` itself, or with `--model-base` the assembled checkpoint.
pub fn weights_folder(model_path: &Path, model_base: Option<&Path>, kind: Kind) -> Result<PathBuf> {
    if !model_path.is_dir() {
        bail!("--model-path {}: no such folder", model_path.display());
    }
    match model_base {
        Some(base) => {
            let dtype = match kind {
                Kind::Half => "fp16",
                Kind::BFloat16 => "bf16",
                _ => "fp32",
            };
            assemble_with_base(model_path, base, dtype)
        }
        None => Ok(model_path.to_path_buf()),
    }
}

/// A checkpoint that needs its `--model-base` (projector-only or LoRA) is assembled once by
/// `arcana-convert` into the cache, keyed by both folders and their config's modification times.
fn assemble_with_base(model_path: &Path, base: &Path, dtype: &str) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let convert = std::env::current_exe()?.with_file_name("arcana-convert");
    if !convert.is_file() {
        bail!("--model-base needs the arcana-convert binary next to this binary ({}); build it with `cargo build -p arcana-convert`", convert.display());
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for dir in [model_path, base] {
        let dir = dir.canonicalize().with_context(|| format!("{}: no such folder", dir.display()))?;
        dir.hash(&mut hasher);
        std::fs::metadata(dir.join("config.json")).and_then(|m| m.modified()).ok().hash(&mut hasher);
    }
    dtype.hash(&mut hasher);
    let cache = std::env::var_os("ARCANA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/arcana")))
        .ok_or_else(|| anyhow::anyhow!("--model-base: set HOME or ARCANA_CACHE for the assembled checkpoint"))?;
    let name = model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let out = cache.join("assembled").join(format!("{name}-{:016x}", hasher.finish()));
    if !out.join("config.json").is_file() {
        eprintln!("Assembling {} with base {} into {} (once)...", model_path.display(), base.display(), out.display());
        let status = std::process::Command::new(&convert)
            .args(["--input".as_ref(), model_path.as_os_str(), "--model-base".as_ref(), base.as_os_str()])
            .args(["--output".as_ref(), out.as_os_str(), "--dtype".as_ref(), dtype.as_ref()])
            .status()
            .with_context(|| format!("running {}", convert.display()))?;
        if !status.success() {
            bail!("--model-base: arcana-convert could not assemble {} with {}", model_path.display(), base.display());
        }
    }
    Ok(out)
}
