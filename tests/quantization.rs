//! Weight-only quantization of the decoder: logits drift against fp32 on the committed lm-mha fixture
//! (made by `python parity/export.py fixtures`). The drift is reported, and bounded loosely: this checks
//! that quantized models still compute the same function approximately, not parity.
mod common;

use arcana::llm::quant::Quantization;
use arcana::model::ArcanaModel;
use arcana::parity::{compare, Reference, Tolerance};
use common::fixture_dir;
use tch::{Device, Kind};

fn logits(model: &ArcanaModel, reference: &Reference) -> tch::Tensor {
    let ids = reference.tensor("input.input_ids").unwrap();
    let pixels = reference.tensor("input.pixel_values").unwrap();
    let inputs = model.prepare_inputs(&ids, None, Some(&pixels)).unwrap();
    model.prefill(&inputs, arcana::llm::MaskPolicy::Release, false).unwrap().logits
}

#[test]
fn int8_and_int4_logits_stay_close_to_fp32_and_save_memory() {
    let dir = fixture_dir("lm-mha");
    let reference = Reference::open(&dir.join("reference.safetensors")).unwrap();
    let exact = ArcanaModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let fp32 = logits(&exact, &reference);
    let mut cosines = Vec::new();
    for mode in [Quantization::Int8, Quantization::Int4] {
        let mut model = ArcanaModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
        let (before, after) = model.llm.quantize(mode).unwrap();
        let report = compare("logits", &logits(&model, &reference), &fp32, &Tolerance::BitIdentical).unwrap();
        println!(
            "{mode:?}: projections {before} -> {after} bytes ({:.2}x smaller); logits max|diff| {:.4e}, max rel {:.4e}, cosine {:.6}",
            before as f64 / after as f64,
            report.max_abs_diff,
            report.max_rel_diff,
            report.cosine
        );
        assert!(after * 3 < before, "{mode:?} saved too little: {before} -> {after}");
        assert!(!report.bit_identical, "{mode:?} changed nothing");
        cosines.push(report.cosine);
    }
    // Expected noise on these random Gaussian weights: an int8 step is ~1/40 of a row's spread (about 1%
    // error per projection), an int4 step ~1/4 of a group's (8% per projection); fourteen projections in
    // series on an untrained model compound that to roughly 1-2% (int8) and 25-35% (int4) of the logits.
    assert!(cosines[0] > 0.999, "int8 logits cosine {}", cosines[0]);
    assert!(cosines[1] > 0.9, "int4 logits cosine {}", cosines[1]);
    assert!(cosines[0] > cosines[1]);
}
