//! `arcana-parity`: runs the Rust model on a PyTorch reference file's inputs and reports, tensor by
//! tensor in forward order, how far it is from the reference. Exits non-zero when a tensor is over
//! tolerance or missing.
use anyhow::Context;
use arcana::llm::placement::{LayerMap, Place};
use arcana::parity::{
    check_on, describe_machine, first_failure, kernel_path_differences, this_machine, Reference, RunOn, StageBounds,
    Status, TensorReport, Tolerance,
};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "Compare the Rust model with tensors exported by parity/export.py")]
struct Args {
    /// Model folder in the release's layout.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Reference file written by `parity/export.py reference`.
    #[arg(long)]
    reference: PathBuf,
    /// Largest accepted max |diff| per tensor. Without it (or --tolerances) every tensor must be
    /// bit-identical, which holds against a reference exported on this machine and kernel path.
    #[arg(long, conflicts_with = "tolerances")]
    max_abs: Option<f64>,
    /// Per-stage bounds (JSON, as tests/fixtures/parity/tolerances.json) for a reference made on another
    /// machine: float tensors within their stage's max rel / cosine bounds, ids exact.
    #[arg(long)]
    tolerances: Option<PathBuf>,
    /// Float tensors need at least this cosine similarity, ids exact (GPU runs: 0.9999).
    #[arg(long, conflicts_with_all = ["tolerances", "max_abs"])]
    min_cosine: Option<f64>,
    /// Where the Rust model runs: cpu, cuda or cuda:N (as the reference's `--device`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The dtype the Rust model runs in (as the reference's `--dtype`).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16", "bf16"])]
    dtype: String,
    /// Decoder layers per device, e.g. "cuda:0=0-0,cpu=1-1" (instead of --device).
    #[arg(long, conflicts_with = "device")]
    device_map: Option<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn run_on(args: &Args) -> anyhow::Result<RunOn> {
    let kind = match args.dtype.as_str() {
        "fp16" => tch::Kind::Half,
        "bf16" => tch::Kind::BFloat16,
        _ => tch::Kind::Float,
    };
    let device = Place::parse(&args.device).with_context(|| format!("--device {}", args.device))?.into();
    let map = args.device_map.as_deref().map(LayerMap::parse).transpose()?;
    Ok(RunOn { kind, device, map })
}

fn print_table(reports: &[TensorReport]) {
    println!(
        "{:<28} {:<18} {:<6} {:>12} {:>12} {:>12} {:>9}  status",
        "tensor", "shape", "dtype", "max|diff|", "max rel", "cosine", "bitexact"
    );
    for r in reports {
        let shape = format!("{:?}", r.shape);
        println!(
            "{:<28} {:<18} {:<6} {:>12.3e} {:>12.3e} {:>12.9} {:>9}  {:?}",
            r.name,
            shape,
            r.dtype,
            r.max_abs_diff,
            r.max_rel_diff,
            r.cosine,
            if r.bit_identical { "yes" } else { "no" },
            r.status
        );
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let tolerance = match (&args.tolerances, args.max_abs, args.min_cosine) {
        (Some(path), _, _) => Tolerance::Stages(StageBounds::load(path)?),
        (None, Some(max_abs), _) => Tolerance::MaxAbs(max_abs),
        (None, None, Some(min)) => Tolerance::MinCosine(min),
        (None, None, None) => Tolerance::BitIdentical,
    };
    let run = run_on(&args)?;
    let made_on = Reference::open(&args.reference)?.machine();
    let here = this_machine();
    let reports = check_on(&args.checkpoint, &args.reference, &tolerance, &run)
        .with_context(|| format!("checking {} against {}", args.checkpoint.display(), args.reference.display()))?;
    let failure = first_failure(&reports);
    let path_differences = if made_on.is_empty() { vec![] } else { kernel_path_differences(&made_on, &here) };
    if args.json {
        let summary = serde_json::json!({
            "checkpoint": args.checkpoint,
            "reference": args.reference,
            "tolerance": tolerance.to_string(),
            "reference_machine": made_on,
            "this_machine": here,
            "device": args.device_map.clone().unwrap_or_else(|| args.device.clone()),
            "dtype": args.dtype,
            "kernel_path_differences": path_differences,
            "tensors": reports,
            "first_failure": failure.map(|r| &r.name),
            "passed": failure.is_none(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("reference computed on: {}", describe_machine(&made_on));
        println!("this run on:           {}", describe_machine(&here));
        if !path_differences.is_empty() {
            println!(
                "kernel paths differ ({}): expect low-bit differences, compare with --tolerances",
                path_differences.join("; ")
            );
        }
        print_table(&reports);
        let identical = reports.iter().filter(|r| r.bit_identical).count();
        println!("{} of {} tensors bit-identical ({tolerance})", identical, reports.len());
        match failure {
            Some(r) if r.status == Status::Missing => {
                println!("FAIL: `{}` is in the reference but the Rust model produced no such tensor", r.name)
            }
            Some(r) => println!("FAIL: first tensor over tolerance: `{}` ({:?})", r.name, r.status),
            None => println!("PASS"),
        }
    }
    Ok(if failure.is_some() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
