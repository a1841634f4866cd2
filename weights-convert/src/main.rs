//! `arcana-convert`: turns any checkpoint form of the release into a self-contained, verified folder that
//! the Rust side loads: safetensors shards in one dtype, the vision tower's config resolved beside them,
//! tokenizer files, and a manifest with every tensor's sha256. Written into a temporary folder beside the
//! target and renamed into place at the end, so no partial output is ever left under the target's name.
mod inputs;
mod lora;
mod output;
mod quantize;
mod source;
mod staging;
mod tokenizer_json;
mod torch_pickle;
mod verify;

use anyhow::{bail, Result};
use arcana::quant::prequantized::{self, FileDigest, QuantizedManifest, SourceDigests};
use arcana::quant::{fbgemm_max_code, LinearStorage, Quantization};
use clap::Parser;
use output::{write_shards, Converted, OutDtype, Outputs, MANIFEST};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
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
    /// Dtype of the floating point tensors written (with --quantize: fp32, the CPU's compute dtype).
    #[arg(long, value_enum, default_value_t = OutDtype::Fp16, conflicts_with = "quantize")]
    dtype: OutDtype,
    /// Write a pre-quantized folder: the decoder's projections and lm_head in this mode's compact form,
    /// which `arcana --load-8bit` / `--load-4bit` / `--dtype fp16` then load in place, as they would
    /// quantize at load (bit for bit), with nothing converted at start.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// With --quantize: keep the vision side's linear weights in fp32 (as `--vision-fp32` at load).
    #[arg(long, requires = "quantize")]
    vision_fp32: bool,
    /// With --quantize int8 or int4: int8 codes that every CPU's kernel takes (up to 63), also on a CPU
    /// with AVX-512 VNNI, whose own codes (up to 127) other CPUs refuse.
    #[arg(long, requires = "quantize")]
    int8_portable: bool,
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

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum QuantizeArg {
    Int8,
    Int4,
    Fp16,
}

impl QuantizeArg {
    fn mode(self) -> Quantization {
        match self {
            Self::Int8 => Quantization::Int8,
            Self::Int4 => Quantization::Int4,
            Self::Fp16 => Quantization::Fp16,
        }
    }
}

/// How the vision side's governed linear weights are written: fp16, as the compact modes keep them on
/// the CPU, unless --vision-fp32.
fn vision(args: &Args) -> LinearStorage {
    if args.vision_fp32 {
        LinearStorage::Dense
    } else {
        LinearStorage::Fp16
    }
}

/// The largest int8 code written: this CPU's kernel's, or the one every CPU takes.
fn int8_max_code(args: &Args) -> u8 {
    if args.int8_portable {
        63
    } else {
        fbgemm_max_code() as u8
    }
}

/// sha256 of every file the source tensors are read from.
fn source_digests(input: &Path, model: &inputs::ConvertModel) -> Result<SourceDigests> {
    let files: BTreeSet<&PathBuf> = model.tensors.tensors.values().map(|t| &t.file).collect();
    let files = files
        .into_iter()
        .map(|path| {
            let (bytes, sha256) = prequantized::file_sha256(path)?;
            Ok(FileDigest { path: path.clone(), bytes, sha256 })
        })
        .collect::<Result<_>>()?;
    Ok(SourceDigests { path: input.to_path_buf(), files })
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
    let dense = if args.quantize.is_some() { OutDtype::Fp32 } else { args.dtype };
    model.write_side_files(staging.path(), dense)?;
    let converted;
    let quantized;
    let outputs: &dyn Outputs = match args.quantize {
        Some(q) => {
            let mode = q.mode();
            let max_code = f64::from(int8_max_code(&args));
            quantized = quantize::Quantized::new(
                &model.tensors.tensors,
                mode,
                vision(&args),
                max_code,
                model.tied(),
                model.language_merged(),
            )?;
            &quantized
        }
        None => {
            converted = Converted::new(&model.tensors.tensors, args.dtype);
            &converted
        }
    };
    let (manifest, files) = write_shards(staging.path(), outputs, args.max_shard_mb * 1_000_000, &stop)?;
    let manifest_json = serde_json::json!({
        "format": "arcana-convert/1",
        "source": args.input,
        "model_base": args.model_base,
        "dtype": dense.torch_name(),
        "quantize": args.quantize.map(|q| q.mode().name()),
        "merge_lora": args.merge_lora,
        "tensors": manifest,
    });
    std::fs::write(staging.path().join(MANIFEST), serde_json::to_vec_pretty(&manifest_json)?)?;
    if let Some(q) = args.quantize {
        let mode = q.mode();
        let quantized_manifest = QuantizedManifest {
            format: prequantized::FORMAT.to_string(),
            arcana_version: prequantized::ARCANA_VERSION.to_string(),
            mode,
            merge_lora: model.language_merged(),
            vision_linears: vision(&args),
            int8_max_code: int8_max_code(&args),
            source: source_digests(&args.input, &model)?,
            files: files.iter().map(|f| prequantized::written_file(f)).collect::<Result<_, _>>()?,
        };
        let path = staging.path().join(prequantized::MANIFEST_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&quantized_manifest)?)?;
    }
    if args.verify {
        let checked = verify::verify(staging.path(), outputs, &stop)?;
        eprintln!("verify: {checked} tensors identical to what the conversion computes from the source");
    }
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    staging.commit(&args.output, args.force)?;
    eprintln!("wrote {} ({} tensors)", args.output.display(), manifest.len());
    Ok(())
}
