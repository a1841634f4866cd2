//! Loading glue shared by the `arcana` and `arcana-serve` binaries: device names and placement flags,
//! weight and thread flags, the default dtype per device, and `--model-base` assembly through
//! `arcana-convert`.
use anyhow::{bail, Context, Result};
use arcana::llm::placement::{LayerMap, MemoryLimits, Place, Placement};
use arcana::quant::{LinearStorage, Quantization};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Where the model runs: the same flags on the CLI and the worker.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceFlags {
    /// cpu, cuda (spread over every visible GPU, as the release's device_map="auto"), cuda:N, or mps
    /// where libtorch has it.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Decoder layers per device, e.g. "cuda:0=0-15,cuda:1=16-31" or "cuda:0=0-27,cpu=28-31".
    #[arg(long, conflicts_with_all = ["device", "max_gpu_memory"])]
    pub device_map: Option<String>,
    /// Memory per device for --device cuda's split over GPUs, e.g. "0:20GiB,1:20GiB" or "13GiB".
    #[arg(long)]
    pub max_gpu_memory: Option<String>,
}

impl DeviceFlags {
    /// The engine's device (where the vision side and the embeddings go) and the placement.
    pub fn resolve(&self) -> Result<(Device, Placement)> {
        placement(&self.device, self.device_map.as_deref(), self.max_gpu_memory.as_deref())
    }
}

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
    /// rounding, with no LoRA work at language positions (every decoded token). On by default with
    /// --load-8bit, --load-4bit and --dtype fp16 on the CPU, which are not bit-identical anyway.
    #[arg(long, conflicts_with = "no_merge_lora")]
    pub merge_lora: bool,
    /// Keep the language branch apart in the compact CPU modes (slower: unmerged branches stay fp32).
    #[arg(long)]
    pub no_merge_lora: bool,
    /// Keep the vision side's linear weights in fp32 in the compact modes above, which otherwise keep
    /// them in fp16 on CPU (computing in fp32): half the vision side's memory, features close to fp32's.
    #[arg(long)]
    pub vision_fp32: bool,
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
    pub vision_linears: LinearStorage,
}

impl WeightFlags {
    /// The choice for a model whose front is on `device`, its parts placed by `placement`.
    pub fn resolve(&self, device: Device, placement: &Placement) -> Result<WeightChoice> {
        let on_cpu_only = device == Device::Cpu && !uses_cuda(placement);
        let mut quantization = match (self.load_8bit, self.load_4bit) {
            (true, _) => Some(Quantization::Int8),
            (_, true) => Some(Quantization::Int4),
            _ => None,
        };
        let kind = match self.dtype {
            Some(DtypeArg::Fp32) => Kind::Float,
            Some(DtypeArg::Fp16) if on_cpu_only => {
                quantization.get_or_insert(Quantization::Fp16);
                Kind::Float
            }
            Some(DtypeArg::Fp16) => Kind::Half,
            Some(DtypeArg::Bf16) => Kind::BFloat16,
            None => default_kind_for(device, placement),
        };
        let vision_linears = match quantization {
            Some(_) if on_cpu_only && kind == Kind::Float && !self.vision_fp32 => LinearStorage::Fp16,
            _ => LinearStorage::Dense,
        };
        let compact_on_cpu = quantization.is_some() && on_cpu_only && kind == Kind::Float;
        let merge_lora = self.merge_lora || (compact_on_cpu && !self.no_merge_lora);
        Ok(WeightChoice { kind, quantization, merge_lora, vision_linears })
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
        // Apple's GPUs: only libtorch builds for macOS on Apple silicon have the MPS backend.
        "mps" if tch::utils::has_mps() => Device::Mps,
        "mps" => {
            bail!("--device mps: the linked libtorch has no MPS backend (only libtorch for macOS on Apple silicon has it); use cpu or cuda")
        }
        other => Place::parse(other).with_context(|| format!("--device {other}"))?.into(),
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

/// `--device`, `--device-map` and `--max-gpu-memory` as the engine's device (where the vision side and
/// the embeddings go) and placement. `--device cuda` spreads the model over every visible GPU, as the
/// release's `device_map="auto"` does; `cuda:N` keeps it on that GPU.
fn placement(device: &str, device_map: Option<&str>, max_gpu_memory: Option<&str>) -> Result<(Device, Placement)> {
    if let Some(text) = device_map {
        let map = LayerMap::parse(text).with_context(|| format!("--device-map {text}"))?;
        for place in map.places() {
            if let Place::Cuda(index) = place {
                let count = tch::Cuda::device_count().max(0) as usize;
                if index >= count {
                    bail!(
                        "--device-map {text}: names {place}, but {count} CUDA device(s) are available to this libtorch"
                    );
                }
            }
        }
        let first = map.segments.iter().find(|s| s.layers.contains(&0)).or(map.segments.first()).map(|s| s.place);
        let device = first.map_or(Device::Cpu, Device::from);
        return Ok((device, Placement::Map(map)));
    }
    if let Some(text) = max_gpu_memory {
        let limits = MemoryLimits::parse(text).with_context(|| format!("--max-gpu-memory {text}"))?;
        if device != "cuda" {
            bail!(
                "--max-gpu-memory spreads the model over every visible GPU: use it with --device cuda (not {device})"
            );
        }
        return Ok((parse_device(device)?, Placement::Auto(limits)));
    }
    let parsed = parse_device(device)?;
    Ok((parsed, if device == "cuda" { Placement::Auto(MemoryLimits::default()) } else { Placement::Single }))
}

/// The default dtype: fp16 when any part runs on a GPU (CPU parts of such a model compute in fp32).
pub fn default_kind_for(device: Device, placement: &Placement) -> Kind {
    if uses_cuda(placement) {
        Kind::Half
    } else {
        default_kind(device)
    }
}

fn uses_cuda(placement: &Placement) -> bool {
    matches!(placement, Placement::Map(map) if map.places().iter().any(|p| p.is_cuda()))
}

/// The placement's line for the user, and its warnings (layers offloaded to the CPU).
pub fn describe_plan(plan: Option<&arcana::llm::placement::Plan>) -> (Option<String>, Vec<String>) {
    match plan {
        Some(plan) => (Some(format!("placement: {}", plan.describe())), plan.notes.clone()),
        None => (None, Vec::new()),
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

/// What the engine keeps from one request for the next, and how it prefills.
#[derive(clap::Args, Debug, Clone)]
pub struct ReuseFlags {
    /// Bytes kept from recent requests so that a request repeating an image, or the beginning of an
    /// earlier prompt (an earlier turn of the conversation, a shared system prompt), skips that work:
    /// image features and prompt KV caches, least recently used out first. Off by default: without
    /// --prefill-chunk a reusing answer equals a fresh one only up to near ties. 2147483648 (2 GiB)
    /// holds about two 700-position prompts of a 7B model in fp32.
    #[arg(long, default_value_t = 0)]
    pub reuse_cache_bytes: usize,
    /// Prefill prompts in forwards of this many positions (default: a whole prompt in one forward, as
    /// the release). A server runs one chunk between two decoding steps of the running answers. Reused
    /// positions then end at a multiple of it, so an answer that reuses them equals a fresh one to the bit.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub prefill_chunk: Option<i64>,
}
