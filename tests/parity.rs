//! The vision side against the committed PyTorch fixtures, made on another machine: every tensor within
//! the per-stage bounds measured across CPU kernel paths (`tests/fixtures/parity/tolerances.json`).
//! Fixtures made by `python parity/export.py fixtures` (torch 2.0.1, transformers 4.37.2, CPU fp32).
//! Bit-identity is a same-machine property: `tests/same_machine.rs` and `scripts/fresh-parity.sh`
//! check it against references exported in the same run.
mod common;

use arcana::parity::{check, Status, Tolerance};
use common::{assert_matches_fixture, fixture_dir};

fn assert_matches(preset: &str) {
    let dir = fixture_dir(preset);
    assert_matches_fixture(&dir, &dir.join("reference.safetensors"), preset);
}

#[test]
fn vision_depth4_select_minus2_matches_its_fixture() {
    assert_matches("vision-d4-sel-2");
}

#[test]
fn vision_depth3_select_minus1_matches_its_fixture() {
    assert_matches("vision-d3-sel-1");
}

#[test]
fn vision_linear_projector_matches_its_fixture() {
    assert_matches("vision-linear");
}

#[test]
fn a_perturbed_weight_fails_at_the_first_tensor_it_reaches() {
    // One ladder bias scaled by 1.0001: CLIP's tensors stay as they were, the comparer must name
    // `qladder.1` as the first tensor over tolerance, under the fixture bounds as well.
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&fixture_dir("vision-d4-sel-2"), tmp.path());
    let file = tmp.path().join("clip-qladder-tiny/model.safetensors");
    let mut tensors = tch::Tensor::read_safetensors(&file).unwrap();
    for (name, tensor) in tensors.iter_mut() {
        if name == "LadderAdapters.1.mlp.fc2.bias" {
            *tensor = &*tensor * 1.0001;
        }
    }
    tch::Tensor::write_safetensors(&tensors, &file).unwrap();
    let dir = fixture_dir("vision-d4-sel-2");
    let reports = check(tmp.path(), &dir.join("reference.safetensors"), &common::fixture_tolerance()).unwrap();
    let first = arcana::parity::first_failure(&reports).expect("the perturbation must be detected");
    assert_eq!(first.name, "qladder.1");
    assert!(reports.iter().filter(|r| r.name.starts_with("vision.hidden_states.")).all(|r| r.status == Status::Ok));
}

#[test]
fn bfloat16_runs_and_stays_close_to_the_fp32_reference() {
    // Not a parity claim: the reference is fp32. bf16 keeps 8 mantissa bits, so features must still
    // point the same way (cosine) while differing in the low bits.
    use arcana::model::VisionSide;
    use tch::{Device, Kind};
    let dir = fixture_dir("vision-d4-sel-2");
    let reference = arcana::parity::Reference::open(&dir.join("reference.safetensors")).unwrap();
    let pixels = reference.tensor(arcana::parity::INPUT_PIXEL_VALUES).unwrap();
    let (_, side) = VisionSide::load_standalone(&dir, Kind::BFloat16, Device::Cpu).unwrap();
    let encoded = side.encode(&pixels.to_kind(Kind::BFloat16)).unwrap();
    assert_eq!(encoded.projected.kind(), Kind::BFloat16);
    let expected = reference.tensor("projector.out").unwrap();
    let report =
        arcana::parity::compare("projector.out", &encoded.projected, &expected, &Tolerance::BitIdentical).unwrap();
    println!("bf16 vs fp32 projector.out: {report:?}");
    assert!(report.cosine > 0.999, "{report:?}");
    assert!(!report.bit_identical);
}

#[test]
fn features_skip_the_layers_after_the_selected_one_and_keep_every_bit() {
    // Select layer -2: the last CLIP layer and the last ladder layer feed nothing. Poisoned with NaN,
    // they must not reach the features; the features must equal the full forward's, bit for bit.
    use arcana::model::VisionSide;
    use tch::{Device, Kind};
    let dir = fixture_dir("vision-d4-sel-2");
    let reference = arcana::parity::Reference::open(&dir.join("reference.safetensors")).unwrap();
    let pixels = reference.tensor(arcana::parity::INPUT_PIXEL_VALUES).unwrap();
    let (_, mut side) = VisionSide::load_standalone(&dir, Kind::Float, Device::Cpu).unwrap();
    let full = side.encode(&pixels).unwrap().projected;
    assert!(side.project(&pixels).unwrap().equal(&full));
    let tower = &mut side.tower;
    let last_clip = tower.vision_model.layers.last_mut().unwrap();
    last_clip.layer_norm1.weight = last_clip.layer_norm1.weight.full_like(f64::NAN);
    let last_ladder = tower.ladder.layers.last_mut().unwrap();
    last_ladder.layer_norm0.weight = last_ladder.layer_norm0.weight.full_like(f64::NAN);
    assert!(side.encode(&pixels).unwrap().vision.hidden_states.last().unwrap().isnan().any().int64_value(&[]) == 1);
    assert!(side.project(&pixels).unwrap().equal(&full));
}
