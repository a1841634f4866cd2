//! Bit-identity where it is defined: the Rust model against a PyTorch reference exported in the same
//! run, on this machine and kernel path (both processes inherit the same ATEN_CPU_CAPABILITY,
//! MKL_ENABLE_INSTRUCTIONS and thread settings). `scripts/fresh-parity.sh` covers every preset and case;
//! this test also shows that the comparison can fail: one ulp in one weight is caught.
//! Skips with a message where the project's Python environment is missing.
mod common;

use arcana::parity::{check, first_failure, Status, Tolerance};
use std::path::Path;
use std::process::Command;
use tch::Tensor;

fn python(args: &[&str]) {
    let python = common::python_with_torch().expect("checked by the caller");
    let out =
        Command::new(python).arg(common::export_py()).args(args).env("PYTHONWARNINGS", "ignore").output().unwrap();
    assert!(out.status.success(), "export.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Adds one unit in the last place to the first element of `name`, wherever the checkpoint stores it.
fn add_one_ulp(checkpoint: &Path, name: &str) {
    for entry in std::fs::read_dir(checkpoint).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let mut tensors = Tensor::read_safetensors(&file).unwrap();
        let Some((_, tensor)) = tensors.iter_mut().find(|(n, _)| n == name) else { continue };
        assert_eq!(tensor.kind(), tch::Kind::Float, "the checkpoint is made in fp32");
        let value = tensor.flatten(0, -1).double_value(&[0]) as f32;
        let next = f32::from_bits(value.to_bits() + 1);
        assert_ne!(value, next);
        let _ = tensor.flatten(0, -1).get(0).fill_(next as f64);
        assert_eq!(tensor.flatten(0, -1).double_value(&[0]) as f32, next);
        Tensor::write_safetensors(&tensors, &file).unwrap();
        return;
    }
    panic!("{name} is in no safetensors file of {}", checkpoint.display());
}

#[test]
fn a_same_run_reference_is_matched_bit_for_bit_and_one_ulp_in_one_weight_is_caught() {
    if common::python_with_torch().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, reference) = (tmp.path().join("ckpt"), tmp.path().join("reference.safetensors"));
    let (ckpt_s, ref_s) = (ckpt.to_str().unwrap(), reference.to_str().unwrap());
    python(&["make-checkpoint", "--preset", "lm-mha", "--dtype", "fp32", "--seed", "11", "--out", ckpt_s]);
    python(&[
        "reference",
        "--checkpoint",
        ckpt_s,
        "--seed",
        "11",
        "--case",
        "image-at-5",
        "--new-tokens",
        "8",
        "--out",
        ref_s,
    ]);

    let reports = check(&ckpt, &reference, &Tolerance::BitIdentical).unwrap();
    for r in &reports {
        println!("same run {:<24} max|diff| {:.3e} bitexact {}", r.name, r.max_abs_diff, r.bit_identical);
    }
    assert!(reports.len() > 10, "too few tensors compared: {reports:?}");
    assert!(first_failure(&reports).is_none(), "not bit-identical on the machine that exported it: {reports:?}");

    add_one_ulp(&ckpt, "model.layers.0.mlp.down_proj.weight");
    let reports = check(&ckpt, &reference, &Tolerance::BitIdentical).unwrap();
    let first = first_failure(&reports).expect("one ulp in a weight must be detected");
    println!("after one ulp: first failure {first:?}");
    assert_eq!(first.status, Status::OverTolerance);
    assert_eq!(first.name, "llm.layers.0", "the first tensor computed from the changed weight");
    assert!(reports
        .iter()
        .filter(|r| r.name.starts_with("vision.") || r.name == "inputs_embeds")
        .all(|r| r.bit_identical));
}
