//! `arcana-parity`: runs the Rust model on a PyTorch reference file's inputs and reports, tensor by
//! tensor in forward order, how far it is from the reference. Exits non-zero when a tensor is over
//! tolerance or missing.
use anyhow::Context;
use arcana::parity::{check, first_failure, Status, Tolerance, TensorReport};
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
    /// Largest accepted max |diff| per tensor; 0 demands bit-identical tensors.
    #[arg(long, default_value_t = 0.0)]
    max_abs: f64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn print_table(reports: &[TensorReport]) {
    println!(
        "{:<28} {:<18} {:<6} {:>12} {:>12} {:>12} {:>9}  {}",
        "tensor", "shape", "dtype", "max|diff|", "max rel", "cosine", "bitexact", "status"
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
    let reports = check(&args.checkpoint, &args.reference, Tolerance { max_abs: args.max_abs })
        .with_context(|| format!("checking {} against {}", args.checkpoint.display(), args.reference.display()))?;
    let failure = first_failure(&reports);
    if args.json {
        let summary = serde_json::json!({
            "checkpoint": args.checkpoint,
            "reference": args.reference,
            "max_abs_tolerance": args.max_abs,
            "tensors": reports,
            "first_failure": failure.map(|r| &r.name),
            "passed": failure.is_none(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&reports);
        let identical = reports.iter().filter(|r| r.bit_identical).count();
        println!("{} of {} tensors bit-identical", identical, reports.len());
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
