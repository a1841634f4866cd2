//! Bit-identical parity with the PyTorch reference on the committed tiny checkpoints.
//! Fixtures made by `python parity/export.py fixtures` (torch 2.0.1, transformers 4.37.2, CPU fp32);
//! `scripts/test.sh` regenerates them with `--check` and also runs the comparer on a new seed.
mod common;

use arcana::parity::{check, Status, Tolerance};
use common::fixture_dir;

fn assert_bit_identical(preset: &str) {
    let dir = fixture_dir(preset);
    let reports = check(&dir, &dir.join("reference.safetensors"), Tolerance::default()).unwrap();
    assert!(!reports.is_empty(), "{preset}: the reference holds no tensor to compare");
    for r in &reports {
        println!("{preset} {:<26} max|diff| {:.3e} cos {:.9} bitexact {}", r.name, r.max_abs_diff, r.cosine, r.bit_identical);
    }
    for r in &reports {
        assert_eq!(r.status, Status::Ok, "{preset}: `{}` differs: {r:?}", r.name);
        assert!(r.bit_identical, "{preset}: `{}` is not bit-identical: {r:?}", r.name);
    }
}

#[test]
fn vision_depth4_select_minus2_is_bit_identical() {
    assert_bit_identical("vision-d4-sel-2");
}

#[test]
fn vision_depth3_select_minus1_is_bit_identical() {
    assert_bit_identical("vision-d3-sel-1");
}

#[test]
fn vision_linear_projector_is_bit_identical() {
    assert_bit_identical("vision-linear");
}
