//! `arcana`: the release's `python -m arcana.serve.cli`, without Python. Same flags, same prompts and
//! the same answers (CPU fp32 is bit-identical to the PyTorch release computed the same way).
use anyhow::{Context, Result};
use arcana::chat::{ChatSession, TurnResult};
use arcana::engine::{Engine, EngineOptions, GenerationParams};
use arcana::generate::constraint::Constraint;
use arcana::mm::visual_span::MaskPolicy;
use arcana::prompt::conversation::cli_display_roles;
use arcana::quant::LinearStorage;
use clap::{Parser, ValueEnum};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

#[path = "shared/mod.rs"]
mod shared;

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
    #[command(flatten)]
    placement: shared::DeviceFlags,
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
    #[command(flatten)]
    weights: shared::WeightFlags,
    /// One question, answered once, then exit (otherwise the interactive loop; a piped stdin gives one question per line).
    #[arg(long)]
    prompt: Vec<String>,
    /// Print ids, text and timings of each turn as JSON on stdout instead of the chat transcript.
    #[arg(long)]
    json: bool,
    /// Answers are JSON valid against the JSON schema in this file.
    #[arg(long, value_name = "FILE", group = "constraint")]
    json_schema: Option<PathBuf>,
    /// Answers match this regular expression as a whole.
    #[arg(long, group = "constraint")]
    regex: Option<String>,
    /// Answers follow the Lark grammar in this file (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "constraint")]
    grammar: Option<PathBuf>,
    /// With --json: each new token's log-probability and its N most likely alternatives (0 to 20).
    #[arg(long, value_name = "N", requires = "json", value_parser = clap::value_parser!(u8).range(0..=20))]
    logprobs: Option<u8>,
    /// Which positions take the visual LoRA branch: as the release (fixed span) or the real image positions.
    #[arg(long, value_enum, default_value_t = PolicyArg::Release)]
    mask_policy: PolicyArg,
    #[command(flatten)]
    reuse: shared::ReuseFlags,
    /// Print timings and each turn's prompt and reply.
    #[arg(long)]
    debug: bool,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum PolicyArg {
    Release,
    Image,
}

/// The constraint of `--json-schema`, `--regex` or `--grammar`.
fn constraint(args: &Args) -> Result<Option<Constraint>> {
    let read = |path: &PathBuf| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    if let Some(path) = &args.json_schema {
        let schema = serde_json::from_str(&read(path)?).with_context(|| format!("{} is not JSON", path.display()))?;
        return Ok(Some(Constraint::JsonSchema(schema)));
    }
    if let Some(path) = &args.grammar {
        return Ok(Some(Constraint::Lark(read(path)?)));
    }
    Ok(args.regex.clone().map(Constraint::Regex))
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

fn main() -> Result<()> {
    let args = Args::parse();
    let (device, placement) = args.placement.resolve()?;
    let choice = args.weights.resolve(device, &placement)?;
    let threads = args.weights.threads()?;
    let (kind, quantization) = (choice.kind, choice.quantization);
    let weights_path = shared::weights_folder(&args.model_path, args.model_base.as_deref(), kind)?;
    let params = GenerationParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_new_tokens: args.max_new_tokens,
        stop: Vec::new(), // the release's CLI computes a stop string but never passes it to `generate`
        seed: args.seed,
        logprobs: args.logprobs.map(usize::from),
        constraint: constraint(&args)?,
    };
    params.check()?;
    let mask_policy = match args.mask_policy {
        PolicyArg::Release => MaskPolicy::Release,
        PolicyArg::Image => MaskPolicy::Image,
    };
    let load_start = Instant::now();
    eprintln!("Loading {} ({kind:?} on {device:?})...", weights_path.display());
    let show_progress = std::io::stderr().is_terminal();
    let model_path = args.model_path.to_string_lossy().into_owned();
    let options = EngineOptions {
        kind,
        device,
        quantization,
        merge_lora: choice.merge_lora,
        vision_linears: choice.vision_linears,
        threads,
        model_name_path: Some(model_path.clone()),
        placement,
        with_model_base: args.model_base.is_some(),
        conv_mode: args.conv_mode.clone(),
        mask_policy,
        reuse_budget_bytes: args.reuse.reuse_cache_bytes,
        prefill_chunk: args.reuse.prefill_chunk,
        // Pillow's pixel limit, as the release's CLI has.
        ..EngineOptions::default()
    };
    let engine = Engine::load_with_progress(&weights_path, options, move |done, total| {
        if show_progress && (done % 16 == 0 || done == total) {
            eprint!("\rLoading weights: {done}/{total} tensors");
        }
    })
    .with_context(|| format!("loading the model from {}", weights_path.display()))?;
    if show_progress {
        eprintln!();
    }
    let (placed, warnings) = shared::describe_plan(engine.plan());
    placed.into_iter().for_each(|line| eprintln!("{line}"));
    warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    let forms = engine.weight_forms();
    if let Some(q) = engine.quantized() {
        let origin = if forms.prequantized { ", read as the pre-quantized folder stores them" } else { "" };
        let merged = if engine.model().llm.language_merged() {
            "language LoRA branch merged into them (--no-merge-lora keeps it apart)"
        } else {
            "language LoRA branch kept apart"
        };
        eprintln!(
            "Decoder projections and lm_head stored as {:?}{origin}: {:.1} MiB -> {:.1} MiB; {merged}; MM-LoRA \
             branches: {}",
            q.mode,
            q.before_bytes as f64 / 1048576.0,
            q.after_bytes as f64 / 1048576.0,
            engine.model().llm.describe_lora_branches()
        );
    }
    let load_seconds = load_start.elapsed().as_secs_f64();

    let preprocess_start = Instant::now();
    let pixel_values = match &args.image_file {
        Some(path) => Some(engine.preprocess_image(path)?),
        None => None,
    };
    if args.conv_mode.is_some() {
        if let Some(warning) = engine.conv_mode().warning() {
            eprintln!("{warning}");
        }
    }
    let mut session = ChatSession::new(&engine, pixel_values, params);
    let preprocess_seconds = preprocess_start.elapsed().as_secs_f64();
    if args.debug {
        eprintln!("[debug] load {load_seconds:.2} s, image preprocess {preprocess_seconds:.2} s");
    }

    let roles = cli_display_roles(engine.model_name(), engine.template());
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
                "[debug] prefill {} positions ({} reused) in {:.3} s, {new_tokens} tokens in {:.3} s ({rate:.1} tokens/s)",
                result.prefill_positions, result.reused_positions, result.prefill_seconds, result.decode_seconds
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
            "quantization": forms.storage.map(|q| format!("{q:?}")),
            "prequantized": forms.prequantized,
            "merge_lora": engine.model().llm.language_merged(),
            "vision_fp16": forms.vision == LinearStorage::Fp16,
            "threads": engine.threads(),
            "image_preprocess_seconds": preprocess_seconds,
            "turns": turns,
        });
        println!("{}", serde_json::to_string_pretty(&output)?);
    }
    Ok(())
}
