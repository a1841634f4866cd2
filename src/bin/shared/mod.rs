//! Loading glue shared by the `arcana` and `arcana-serve` binaries: device names and placement flags,
//! the default dtype per device, and `--model-base` assembly through `arcana-convert`.
use anyhow::{bail, Context, Result};
use arcana::llm::placement::{LayerMap, MemoryLimits, Place, Placement};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        // Apple's GPUs: only libtorch builds for macOS on Apple silicon have the MPS backend.
        "mps" if tch::utils::has_mps() => Device::Mps,
        "mps" => {
            bail!("--device mps: the linked libtorch has no MPS backend (only libtorch for macOS on Apple silicon has it); use cpu or cuda")
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

/// `--device`, `--device-map` and `--max-gpu-memory` as the engine's device (where the vision side and
/// the embeddings go) and placement. `--device cuda` spreads the model over every visible GPU, as the
/// release's `device_map="auto"` does; `cuda:N` keeps it on that GPU.
pub fn placement(device: &str, device_map: Option<&str>, max_gpu_memory: Option<&str>) -> Result<(Device, Placement)> {
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
        let device = match first {
            Some(Place::Cuda(index)) => Device::Cuda(index),
            _ => Device::Cpu,
        };
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
    match placement {
        Placement::Map(map) if map.places().iter().any(|p| p.is_cuda()) => Kind::Half,
        _ => default_kind(device),
    }
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
