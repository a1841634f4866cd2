//! The compact weight modes (int8, fp16 weights, int4; each with and without the language branch merged at
//! load) against fp32 on the committed lm-mha fixture (made by `python parity/export.py fixtures`): logits
//! cosine and top-1 agreement over every prompt position, and the bytes saved. Bounds are the measured
//! values of `cargo test --test quantization -- --nocapture` (printed per mode) with a margin, on random
//! Gaussian weights, where a quantization step is a larger share of a weight's spread than in trained ones.
mod common;

use arcana::model::{ArcanaModel, ModelFiles, VisionSide};
use arcana::parity::{compare, Reference, Tolerance};
use arcana::quant::{BaseWeight, LinearStorage, Quantization, WeightForms};
use common::fixture_dir;
use tch::{Device, Kind, Tensor};

fn load(storage: WeightForms) -> ArcanaModel {
    ArcanaModel::load_with_progress(&fixture_dir("lm-mha"), Kind::Float, Device::Cpu, storage, |_, _| {}).unwrap()
}

fn logits(model: &ArcanaModel, reference: &Reference) -> Tensor {
    let ids = reference.tensor("input.input_ids").unwrap();
    let pixels = reference.tensor("input.pixel_values").unwrap();
    let inputs = model.prepare_inputs(&ids, None, Some(&pixels)).unwrap();
    model.prefill(&inputs, arcana::mm::visual_span::MaskPolicy::Release, false).unwrap().logits
}

struct Drift {
    cosine: f64,
    top1: f64,
    bytes: usize,
}

fn drift(storage: WeightForms, exact: &Tensor, reference: &Reference) -> Drift {
    let model = load(storage);
    let got = logits(&model, reference);
    let report = compare("logits", &got, exact, &Tolerance::BitIdentical).unwrap();
    let agree = got.argmax(-1, false).eq_tensor(&exact.argmax(-1, false));
    let top1 = agree.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    let bytes = model.llm.base_weights().map(|w| w.bytes()).sum();
    println!(
        "{:?} merge_lora={}: logits cosine {:.6}, max rel {:.3e}, top-1 agreement {:.4} over {} positions, \
         projections + lm_head {bytes} bytes",
        storage.storage,
        storage.merge_lora,
        report.cosine,
        report.max_rel_diff,
        top1,
        agree.numel()
    );
    Drift { cosine: report.cosine, top1, bytes }
}

#[test]
fn compact_weight_modes_stay_close_to_fp32_and_save_memory() {
    let reference = Reference::open(&fixture_dir("lm-mha").join("reference.safetensors")).unwrap();
    let fp32 = load(WeightForms::default());
    let exact = logits(&fp32, &reference);
    let dense_bytes: usize = fp32.llm.base_weights().map(|w| w.bytes()).sum();

    let merged = drift(WeightForms { merge_lora: true, ..Default::default() }, &exact, &reference);
    // Merging is exact up to fp32 rounding of `W + s * B A`.
    assert!(merged.cosine > 0.999_999_9, "merged fp32 cosine {}", merged.cosine);
    assert_eq!(merged.top1, 1.0);

    for merge_lora in [false, true] {
        let mode = |q| WeightForms { storage: Some(q), merge_lora, ..Default::default() };
        let fp16 = drift(mode(Quantization::Fp16), &exact, &reference);
        let int8 = drift(mode(Quantization::Int8), &exact, &reference);
        let int4 = drift(mode(Quantization::Int4), &exact, &reference);
        // Measured (see the module docs), unmerged / merged: fp16 cosine 1.0 / 1.0 (exact unmerged: the
        // fixture's weights are fp16 values), top-1 1.0 / 0.9985; int8 cosine 0.99951 / 0.99896, top-1
        // 0.945 / 0.945 (each row's activations on its own grid, the image-position LoRA branches in
        // int8; 0.99969 / 0.99941 and 0.954 / 0.960 with those branches in fp16, 0.99915 / 0.99830 and
        // 0.948 / 0.938 with one activation range per call); int4 cosine 0.9747 / 0.9554, top-1 0.735 /
        // 0.623 (scales and low ends in fp16; 0.9744 / 0.9555 and 0.728 / 0.621 with them in fp32) (676
        // positions, vocab 128). The fixture's LoRA factors are as large as its base
        // weights, so the branches' int8 rounding weighs more here than beside trained ones.
        // Merging first widens the rows' ranges (random LoRA factors), so the steps grow.
        let (int8_cos, int8_top1, int4_cos, int4_top1) =
            if merge_lora { (0.996, 0.90, 0.92, 0.5) } else { (0.998, 0.92, 0.95, 0.6) };
        assert!(fp16.cosine > 0.999_99, "fp16 cosine {}", fp16.cosine);
        assert!(int8.cosine > int8_cos, "int8 cosine {}", int8.cosine);
        assert!(int4.cosine > int4_cos, "int4 cosine {}", int4.cosine);
        assert!(fp16.top1 >= 0.99, "fp16 top-1 {}", fp16.top1);
        assert!(int8.top1 >= int8_top1, "int8 top-1 {}", int8.top1);
        assert!(int4.top1 >= int4_top1, "int4 top-1 {}", int4.top1);
        assert!(fp16.cosine >= int8.cosine && int8.cosine > int4.cosine);
        // fp16 keeps a bias vector per projection (zeros where it has none): the kernel requires one.
        assert!(fp16.bytes * 100 <= dense_bytes * 52, "fp16 {} of {dense_bytes}", fp16.bytes);
        assert!(int8.bytes * 3 < dense_bytes, "int8 {} of {dense_bytes}", int8.bytes);
        assert!(int4.bytes < int8.bytes, "int4 {} vs int8 {}", int4.bytes, int8.bytes);
    }
}

/// The vision side's linears kept in fp16 (`LinearStorage::Fp16`, what the CLI's compact modes use on
/// CPU) against fp32, on the vision-d4-sel-2 fixture, whose fp32 weights are not fp16 values.
#[test]
fn fp16_vision_linears_stay_close_to_fp32_and_halve_their_memory() {
    let dir = fixture_dir("vision-d4-sel-2");
    let reference = Reference::open(&dir.join("reference.safetensors")).unwrap();
    let pixels = reference.tensor("input.pixel_values").unwrap();
    let load = |linears| {
        let files = ModelFiles::open(&dir).unwrap();
        let loader = files.weight_loader(Kind::Float, Device::Cpu).unwrap();
        VisionSide::load(&files, &loader, linears).unwrap()
    };
    let (dense, fp16) = (load(LinearStorage::Dense), load(LinearStorage::Fp16));
    let exact = dense.encode(&pixels).unwrap().projected;
    let got = fp16.encode(&pixels).unwrap().projected;
    let report = compare("projected", &got, &exact, &Tolerance::BitIdentical).unwrap();
    let bytes = |side: &VisionSide| side.tower.linears().map(BaseWeight::bytes).sum::<usize>();
    let (dense_bytes, fp16_bytes) = (bytes(&dense), bytes(&fp16));
    println!(
        "fp16 vision linears: projected features cosine {:.9}, max rel {:.3e}; linears {fp16_bytes} of {dense_bytes} bytes",
        report.cosine, report.max_rel_diff
    );
    assert!(!report.bit_identical, "fp16 storage changed nothing: the weights were fp16 values already");
    // Measured (`cargo test --test quantization -- --nocapture`): cosine 0.999999952, max rel 3.4e-4.
    assert!(report.cosine > 0.999_99, "cosine {}", report.cosine);
    assert_eq!(fp16_bytes * 2, dense_bytes);
}

/// The prompt's last-position logits and each decoding step's over `tokens` (fed as given), with the
/// KV cache in fp16 or in fp32; and the cache's bytes.
fn decoded_logits(model: &mut ArcanaModel, kv_fp16: bool, tokens: &[i64]) -> (Vec<Tensor>, usize) {
    model.llm.model.kv_fp16 = kv_fp16;
    let reference = Reference::open(&fixture_dir("lm-mha").join("reference.safetensors")).unwrap();
    let ids = reference.tensor("input.input_ids").unwrap();
    let pixels = reference.tensor("input.pixel_values").unwrap();
    let inputs = model.prepare_inputs(&ids, None, Some(&pixels)).unwrap();
    let length = inputs.inputs_embeds.size()[1];
    let mut cache = model.new_cache(1, length + tokens.len() as i64).unwrap();
    let first = model.first_step(&inputs, arcana::mm::visual_span::MaskPolicy::Release, &mut cache).unwrap();
    let (mut mask, mut all) = (first.mask, vec![first.logits]);
    let visual = Tensor::zeros([1, 1], (Kind::Bool, Device::Cpu));
    for &token in tokens {
        mask = Tensor::cat(&[&mask, &Tensor::ones([1, 1], (Kind::Int64, Device::Cpu))], 1);
        all.push(model.token_step(&[token], &mask, &visual, &mut cache).unwrap());
    }
    (all, cache.cached_bytes())
}

/// The compact modes' fp16 KV cache against an fp32 one, the same model and the same tokens: the
/// prefill's last logits and 16 decoding steps'. In fp16-weights mode, whose activations are not
/// quantized: under int8 a difference of one ulp can move an activation to the next code, which hides
/// what the cache itself changes.
#[test]
fn an_fp16_kv_cache_stays_close_to_an_fp32_one_at_half_the_bytes() {
    let forms = WeightForms { storage: Some(Quantization::Fp16), merge_lora: true, ..Default::default() };
    let mut model = load(forms);
    assert!(model.llm.model.kv_fp16, "the compact modes keep the cache in fp16");
    let (fp32, _) = decoded_logits(&mut model, false, &[]);
    // Greedy tokens of the fp32-cache run, fed to both.
    let mut tokens = Vec::new();
    let mut last = fp32[0].shallow_clone();
    for _ in 0..16 {
        tokens.push(last.argmax(-1, false).int64_value(&[0]));
        let (steps, _) = decoded_logits(&mut model, false, &tokens);
        last = steps.last().unwrap().shallow_clone();
    }
    let (want, fp32_bytes) = decoded_logits(&mut model, false, &tokens);
    let (got, fp16_bytes) = decoded_logits(&mut model, true, &tokens);
    let (mut worst_cosine, mut worst_rel, mut same_top1) = (1.0f64, 0.0f64, 0);
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        let report = compare(&format!("step {step}"), g, w, &Tolerance::BitIdentical).unwrap();
        worst_cosine = worst_cosine.min(report.cosine);
        worst_rel = worst_rel.max(report.max_rel_diff);
        same_top1 += usize::from(g.argmax(-1, false).equal(&w.argmax(-1, false)));
    }
    println!(
        "fp16 KV cache: worst logits cosine {worst_cosine:.9}, worst max rel {worst_rel:.3e}, top-1 equal \
         {same_top1} of {} steps; cache {fp16_bytes} of {fp32_bytes} bytes",
        got.len()
    );
    assert_eq!(fp16_bytes * 2, fp32_bytes);
    // Measured (`cargo test --test quantization fp16_kv -- --nocapture`): worst cosine 0.999999695, worst
    // max rel 8.5e-4, top-1 equal in 17 of 17 steps.
    assert!(worst_cosine > 0.999_99, "worst cosine {worst_cosine}");
    assert_eq!(same_top1, got.len());
}
