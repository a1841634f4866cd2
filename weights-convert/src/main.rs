//! `arcana-convert`: turns any checkpoint form of the release into a self-contained, verified folder that
//! the Rust side loads: safetensors shards in one dtype, the vision tower's config resolved beside them,
//! tokenizer files, and a manifest with every tensor's sha256. Written into a temporary folder beside the
//! target and renamed into place at the end, so no partial output is ever left under the target's name.
mod inputs;
mod lora;
mod output;
mod source;
mod staging;
mod tokenizer_json;
mod torch_pickle;
mod verify;

use anyhow::{bail, Result};
use clap::Parser;
use output::{write_shards, OutDtype, MANIFEST};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    version,
    about = "Convert a release checkpoint (safetensors, PyTorch .bin, base + projector, base + LoRA) to a verified folder"
)]
struct Args {
    /// The release's model folder (`--model-path` of the release's CLI).
    #[arg(long, alias = "model-path")]
    input: PathBuf,
    /// Base model folder, for a checkpoint holding only `mm_projector.bin` or LoRA training output
    /// (`non_lora_trainables.bin` + a PEFT adapter) (the release's `--model-base`).
    #[arg(long)]
    model_base: Option<PathBuf>,
    /// Output folder; must not exist unless --force.
    #[arg(long)]
    output: PathBuf,
    /// Dtype of the floating point tensors written.
    #[arg(long, value_enum, default_value_t = OutDtype::Fp16)]
    dtype: OutDtype,
    /// Largest shard, in MB (a single tensor above it gets a shard of its own).
    #[arg(long, default_value_t = 4000)]
    max_shard_mb: u64,
    /// Fold MM-LoRA's language branch into the base weights, so language tokens cost no LoRA work
    /// (the model then subtracts it at visual positions; see README).
    #[arg(long)]
    merge_lora: bool,
    /// Reload the written folder and compare every tensor with the source, bit for bit.
    #[arg(long)]
    verify: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
}

/// Large tensors come and go one at a time; a fixed mmap threshold returns each one to the system when
/// it is freed (glibc's dynamic threshold would move them to the heap, where fragmentation can keep
/// hundreds of MB resident).
fn return_large_allocations_to_the_system() {
    // SAFETY: mallopt only changes allocator tuning; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> Result<()> {
    return_large_allocations_to_the_system();
    let args = Args::parse();
    if args.output.exists() && !args.force {
        bail!("{} already exists; pass --force to replace it", args.output.display());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))?;
    }
    let model = inputs::gather(&args.input, args.model_base.as_deref(), args.merge_lora)?;
    let staging = staging::Staging::beside(&args.output)?;
    model.write_side_files(staging.path(), args.dtype)?;
    let manifest =
        write_shards(staging.path(), &model.tensors.tensors, args.dtype, args.max_shard_mb * 1_000_000, &stop)?;
    let manifest_json = serde_json::json!({
        "format": "arcana-convert/1",
        "source": args.input,
        "model_base": args.model_base,
        "dtype": args.dtype.torch_name(),
        "merge_lora": args.merge_lora,
        "tensors": manifest,
    });
    std::fs::write(staging.path().join(MANIFEST), serde_json::to_vec_pretty(&manifest_json)?)?;
    if args.verify {
        let checked = verify::verify(staging.path(), &model.tensors.tensors, args.dtype, &stop)?;
        eprintln!("verify: {checked} tensors identical to the source converted to {}", args.dtype.torch_name());
    }
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    staging.commit(&args.output, args.force)?;
    eprintln!("wrote {} ({} tensors)", args.output.display(), manifest.len());
    Ok(())
}
