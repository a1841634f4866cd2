//! Loading-memory benchmark: peak resident memory while loading the vision side of a checkpoint,
//! against the size of the weights it loads.
//!
//!     python parity/bench/make_load_checkpoint.py --out /tmp/arcana-load-bench
//!     cargo run --release --example load_memory -- /tmp/arcana-load-bench
use arcana::model::{ModelFiles, VisionSide, PROJECTOR_PREFIX, VISION_TOWER_PREFIX};
use arcana::quant::LinearStorage;
use std::path::PathBuf;
use tch::{Device, Kind};

/// A field of /proc/self/status in bytes (VmRSS, VmHWM).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = status.lines().find(|l| l.starts_with(field)).expect("field present");
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number");
    kb * 1024
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: load_memory DIR"))?);
    // Touch libtorch first so its own start-up memory is not counted as loading.
    let _ = tch::Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let before = status_bytes("VmRSS:");
    let start = std::time::Instant::now();
    let files = ModelFiles::open(&dir)?;
    let loader = files.weight_loader(Kind::Float, Device::Cpu)?;
    let side = VisionSide::load(&files, &loader, LinearStorage::Dense)?;
    let weights = loader.loaded_bytes();
    loader.finish_under(&[VISION_TOWER_PREFIX, PROJECTOR_PREFIX])?;
    let elapsed = start.elapsed();
    let peak = status_bytes("VmHWM:");
    let after = status_bytes("VmRSS:");
    drop(side);
    println!("weights loaded:         {:.3} GiB", gib(weights));
    println!("RSS before loading:     {:.3} GiB", gib(before));
    println!("RSS after loading:      {:.3} GiB", gib(after));
    println!("peak RSS:               {:.3} GiB", gib(peak));
    println!("peak growth / weights:  {:.3}", (peak - before) as f64 / weights as f64);
    println!("peak / weights:         {:.3}", peak as f64 / weights as f64);
    println!("load time:              {:.2} s", elapsed.as_secs_f64());
    Ok(())
}
