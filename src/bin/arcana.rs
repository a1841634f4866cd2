//! `arcana`: the release's `python -m arcana.serve.cli`, without Python. Same flags, same prompts and
//! the same answers (CPU fp32 is bit-identical to the PyTorch release computed the same way).
use anyhow::{bail, Context, Result};
use arcana::chat::{ChatOptions, ChatSession, TurnResult};
use arcana::config::VisionTowerSource;
use arcana::llm::mask::MaskPolicy;
use arcana::llm::quant::Quantization;
use arcana::model::ArcanaModel;
use arcana::sampling::Decoding;
use arcana::tokenizer::Tokenizer;
use arcana::vision::preprocess::{ImagePreprocessor, PreprocessConfig, AspectMode};
use clap::{Parser, ValueEnum};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};

#[derive(Parser, Debug)]
#[command(version, about = "Chat with an Arcana checkpoint (the release's serve/cli.py flags)")]
struct Args {
    /// Model folder in the release's layout.
    #[arg(long)]
    model_path: PathBuf,
    /// Base model for a checkpoint holding only a projector or LoRA weights.
    #[arg(long)]
    model_base: Option<PathBuf>,
    /// Image shown with the first message.
    #[arg(long, alias = "file")]
    image_file: Option<PathBuf>,
    /// cpu, cuda, cuda:N (mps is not available through libtorch here).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Conversation template; by default chosen from the model folder's name as the release does.
    #[arg(long)]
    conv_mode: Option<String>,
    /// 0 decodes greedily; above 0 samples.
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling mass (default: generation_config.json, else off).
    #[arg(long)]
    top_p: Option<f64>,
    /// Top-k sampling (default: generation_config.json, else 50; 0 turns it off).
    #[arg(long)]
    top_k: Option<i64>,
    /// Seeds libtorch's generator once before the first answer, as `torch.manual_seed` does.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Weights dtype: fp32 (CPU default), fp16 (CUDA default) or bf16.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// 8-bit weight-only quantization of the decoder's linear layers.
    #[arg(long, conflicts_with = "load_4bit")]
    load_8bit: bool,
    /// 4-bit weight-only quantization of the decoder's linear layers.
    #[arg(long)]
    load_4bit: bool,
    /// One question, answered once, then exit (otherwise the interactive loop; a piped stdin gives one question per line).
    #[arg(long)]
    prompt: Vec<String>,
    /// Print ids, text and timings of each turn as JSON on stdout instead of the chat transcript.
    #[arg(long)]
    json: bool,
    /// Which positions take the visual LoRA branch: as the release (fixed span) or the real image positions.
    #[arg(long, value_enum, default_value_t = PolicyArg::Release)]
    mask_policy: PolicyArg,
    /// Print timings and each turn's prompt and reply.
    #[arg(long)]
    debug: bool,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum DtypeArg {
    Fp32,
    Fp16,
    Bf16,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum PolicyArg {
    Release,
    Image,
}

fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        "mps" => bail!("--device mps: this build runs on libtorch for Linux, which has no MPS backend; use cpu or cuda"),
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

fn image_preprocessor(model: &ArcanaModel) -> Result<ImagePreprocessor> {
    let aspect = model.files.config.image_aspect_ratio.as_deref();
    match &model.files.vision_source {
        VisionTowerSource::Folder(folder) if folder.join("preprocessor_config.json").is_file() => {
            Ok(ImagePreprocessor::from_files(&folder.join("preprocessor_config.json"), aspect)?)
        }
        _ => Ok(ImagePreprocessor::new(PreprocessConfig::default(), AspectMode::from_image_aspect_ratio(aspect)?)),
    }
}

/// The questions: `--prompt` values, else lines of a piped stdin, else the interactive prompt.
enum Questions {
    Given(std::vec::IntoIter<String>),
    Lines { interactive: bool },
}

impl Questions {
    fn next(&mut self, role: &str, json: bool) -> Result<Option<String>> {
        match self {
            Questions::Given(items) => Ok(items.next()),
            Questions::Lines { interactive } => {
                if *interactive || !json {
                    print!("{role}: ");
                    std::io::stdout().flush()?;
                }
                let mut line = String::new();
                let read = std::io::stdin().lock().read_line(&mut line).context("reading the question from stdin")?;
                let text = line.trim_end_matches(['\n', '\r']).to_string();
                if read == 0 || text.is_empty() {
                    if !json {
                        println!("exit...");
                    }
                    return Ok(None);
                }
                Ok(Some(text))
            }
        }
    }
}

/// A checkpoint that needs its `--model-base` (projector-only or LoRA) is assembled once by
/// `arcana-convert` into the cache, keyed by both folders and their config's modification times.
fn assemble_with_base(model_path: &Path, base: &Path, dtype: &str) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let convert = std::env::current_exe()?.with_file_name("arcana-convert");
    if !convert.is_file() {
        bail!("--model-base needs the arcana-convert binary next to arcana ({}); build it with `cargo build -p arcana-convert`", convert.display());
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

fn main() -> Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let kind = match args.dtype {
        Some(DtypeArg::Fp32) => Kind::Float,
        Some(DtypeArg::Fp16) => Kind::Half,
        Some(DtypeArg::Bf16) => Kind::BFloat16,
        None if device == Device::Cpu => Kind::Float,
        None => Kind::Half,
    };
    if !args.model_path.is_dir() {
        bail!("--model-path {}: no such folder", args.model_path.display());
    }
    let weights_path = match &args.model_base {
        Some(base) => {
            let dtype = match kind {
                Kind::Half => "fp16",
                Kind::BFloat16 => "bf16",
                _ => "fp32",
            };
            assemble_with_base(&args.model_path, base, dtype)?
        }
        None => args.model_path.clone(),
    };
    let decoding = Decoding::for_cli(&weights_path, args.temperature, args.top_k, args.top_p)?;
    let mask_policy = match args.mask_policy {
        PolicyArg::Release => MaskPolicy::Release,
        PolicyArg::Image => MaskPolicy::Image,
    };

    let load_start = Instant::now();
    eprintln!("Loading {} ({kind:?} on {device:?})...", weights_path.display());
    let show_progress = std::io::stderr().is_terminal();
    let mut model = ArcanaModel::load_with_progress(&weights_path, kind, device, move |done, total| {
        if show_progress && (done % 16 == 0 || done == total) {
            eprint!("\rLoading weights: {done}/{total} tensors");
        }
    })
    .with_context(|| format!("loading the model from {}", weights_path.display()))?;
    if show_progress {
        eprintln!();
    }
    let quantization = match (args.load_8bit, args.load_4bit) {
        (true, _) => Some(Quantization::Int8),
        (_, true) => Some(Quantization::Int4),
        _ => None,
    };
    if let Some(mode) = quantization {
        let (before, after) = model.llm.quantize(mode)?;
        eprintln!(
            "Quantized the decoder's projections to {mode:?}: {:.1} MiB -> {:.1} MiB (MM-LoRA branches kept in {kind:?})",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
    }
    let tokenizer = Tokenizer::for_release(&weights_path, &args.model_path, args.model_base.is_some())
        .with_context(|| format!("loading the tokenizer from {}", weights_path.display()))?;
    let load_seconds = load_start.elapsed().as_secs_f64();

    let encode_start = Instant::now();
    let pixel_values = match &args.image_file {
        Some(path) => Some(image_preprocessor(&model)?.image_tensor(path)?),
        None => None,
    };
    let options = ChatOptions { conv_mode: args.conv_mode.clone(), decoding, max_new_tokens: args.max_new_tokens, mask_policy };
    let model_path = args.model_path.to_string_lossy().into_owned();
    if let Some(choice) = args.conv_mode.as_deref().map(|flag| {
        arcana::mm::conversation::resolve_conv_mode(
            &arcana::mm::conversation::model_name_from_path(&model_path).unwrap_or_default(),
            Some(flag),
        )
    }) {
        if let Some(warning) = choice.warning() {
            eprintln!("{warning}");
        }
    }
    let mut session = ChatSession::new(&model, &tokenizer, &model_path, pixel_values.as_ref(), options)?;
    let encode_seconds = encode_start.elapsed().as_secs_f64();
    if args.debug {
        eprintln!("[debug] load {load_seconds:.2} s, image encode {encode_seconds:.2} s");
    }
    if let Some(seed) = args.seed {
        tch::manual_seed(seed as i64);
    }

    let roles = arcana::mm::conversation::cli_display_roles(
        &arcana::mm::conversation::model_name_from_path(&model_path).unwrap_or_default(),
        session.chat().conversation(),
    );
    let interactive = std::io::stdin().is_terminal();
    let mut questions = if args.prompt.is_empty() {
        Questions::Lines { interactive }
    } else {
        Questions::Given(args.prompt.clone().into_iter())
    };
    let mut turns: Vec<TurnResult> = Vec::new();
    let mut warned = false;
    while let Some(question) = questions.next(&roles[0], args.json)? {
        if !args.json {
            print!("{}: ", roles[1]);
            std::io::stdout().flush()?;
        }
        let json = args.json;
        let result = session.turn(&question, |piece| {
            if !json {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
        })?;
        if !args.json {
            println!();
        }
        if result.mask_policies_differ && mask_policy == MaskPolicy::Release && !warned {
            eprintln!(
                "warning: the release's visual-LoRA span (positions 35..675) and this prompt's image features are not the same \
                 positions; --mask-policy image applies the visual branch to the image features only"
            );
            warned = true;
        }
        if args.debug {
            let new_tokens = result.output_ids.len().saturating_sub(1);
            let rate = if result.decode_seconds > 0.0 { new_tokens as f64 / result.decode_seconds } else { 0.0 };
            eprintln!(
                "[debug] prefill {} positions in {:.3} s, {new_tokens} tokens in {:.3} s ({rate:.1} tokens/s)",
                result.prefill_positions, result.prefill_seconds, result.decode_seconds
            );
            eprintln!("\n {}\n", serde_json::json!({"prompt": result.prompt, "outputs": result.reply}));
        }
        turns.push(result);
    }
    if args.json {
        let output = serde_json::json!({
            "model_path": args.model_path,
            "image_file": args.image_file,
            "load_seconds": load_seconds,
            "quantization": quantization.map(|q| format!("{q:?}")),
            "image_encode_seconds": encode_seconds,
            "turns": turns,
        });
        println!("{}", serde_json::to_string_pretty(&output)?);
    }
    Ok(())
}
