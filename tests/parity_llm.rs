//! The language side against the committed PyTorch fixtures (CPU, fp32; made on another machine, so
//! within the per-stage bounds of `tests/fixtures/parity/tolerances.json`, greedy ids exact), and the
//! cached decoder against re-running the whole sequence.
//! Fixtures made by `python parity/export.py fixtures` (torch 2.0.1, transformers 4.37.2, CPU fp32):
//! `lm-mha` (4 KV heads, fp16 weights in 2 shards) and `lm-gqa` (2 KV heads, bf16 weights); cases in
//! `parity/README.md`. Bit-identity against a same-run export: `tests/same_machine.rs`.
mod common;

use arcana::generate::{Flow, Stepping, TokenChooser};
use arcana::mm::splice::{pad_rows, splice};
use arcana::mm::visual_span::{policies_differ, MaskPolicy};
use arcana::model::ArcanaModel;
use arcana::parity::{check, first_failure, Reference, StageBounds, Status};
use common::{assert_matches_fixture, fixture_dir};
use tch::{Device, Kind, Tensor};

fn assert_matches(preset: &str, file: &str) {
    let dir = fixture_dir(preset);
    let reports = assert_matches_fixture(&dir, &dir.join(file), &format!("{preset}/{file}"));
    for name in ["inputs_embeds", "llm.layers.0", "llm.layers.1", "llm.norm", "logits", "greedy.ids"] {
        assert!(reports.iter().any(|r| r.name == name), "{preset}/{file}: no `{name}` compared");
    }
    let ids = reports.iter().find(|r| r.name == "greedy.ids").unwrap();
    assert!(ids.bit_identical, "{preset}/{file}: greedy ids differ: {ids:?}");
}

#[test]
fn mha_image_long_matches_its_fixture() {
    assert_matches("lm-mha", "reference.safetensors");
}

#[test]
fn mha_text_only_matches_its_fixture() {
    assert_matches("lm-mha", "reference.text.safetensors");
}

#[test]
fn mha_image_at_5_matches_its_fixture() {
    assert_matches("lm-mha", "reference.image-at-5.safetensors");
}

#[test]
fn mha_two_images_matches_its_fixture() {
    assert_matches("lm-mha", "reference.two-images.safetensors");
}

#[test]
fn mha_padded_batch_matches_its_fixture() {
    assert_matches("lm-mha", "reference.batch2.safetensors");
}

#[test]
fn gqa_image_long_matches_its_fixture() {
    assert_matches("lm-gqa", "reference.safetensors");
}

#[test]
fn a_fixture_tensor_moved_by_ten_times_its_tolerance_fails() {
    // One element of `llm.layers.1` moved by 10x the stage's max rel bound (times max |reference|):
    // the fixture comparison must name it first; greedy ids moved by one token must fail too.
    let dir = fixture_dir("lm-mha");
    let bounds = match common::fixture_tolerance() {
        arcana::parity::Tolerance::Stages(b) => b,
        other => panic!("{other:?}"),
    };
    let bound = *StageBounds::for_tensor(&bounds, "llm.layers.1").expect("a bound for llm.layers");
    for (target, expected_first) in [("llm.layers.1", "llm.layers.1"), ("greedy.ids", "greedy.ids")] {
        let tmp = tempfile::tempdir().unwrap();
        let mut tensors = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap();
        for (name, tensor) in tensors.iter_mut() {
            if name == target {
                let flat = tensor.flatten(0, -1);
                let step = if tensor.is_floating_point() {
                    10.0 * bound.max_rel * tensor.abs().max().double_value(&[])
                } else {
                    1.0
                };
                let first = flat.get(0);
                let moved = &first + step;
                flat.get(0).copy_(&moved);
                *tensor = flat.view(tensor.size().as_slice());
            }
        }
        let file = tmp.path().join("reference.safetensors");
        Tensor::write_safetensors(&tensors, &file).unwrap();
        let reports = check(&dir, &file, &common::fixture_tolerance()).unwrap();
        let first = first_failure(&reports).expect("the moved tensor must fail");
        println!("{target} moved: {first:?}");
        assert_eq!(first.name, expected_first);
        assert_eq!(first.status, Status::OverTolerance);
    }
}

fn load(preset: &str) -> ArcanaModel {
    ArcanaModel::load(&fixture_dir(preset), Kind::Float, Device::Cpu).unwrap()
}

fn reference_inputs(model: &ArcanaModel, preset: &str, file: &str) -> arcana::mm::splice::Spliced {
    let reference = Reference::open(&fixture_dir(preset).join(file)).unwrap();
    let ids = reference.tensor("input.input_ids").unwrap();
    let mask = reference.contains("input.attention_mask").then(|| reference.tensor("input.attention_mask").unwrap());
    let pixels = reference.contains("input.pixel_values").then(|| reference.tensor("input.pixel_values").unwrap());
    model.prepare_inputs(&ids, mask.as_ref(), pixels.as_ref()).unwrap()
}

#[test]
fn cached_decoding_gives_the_ids_of_rerunning_the_whole_sequence() {
    let model = load("lm-mha");
    for (file, policy) in [
        ("reference.image-at-5.safetensors", MaskPolicy::Image),
        ("reference.image-at-5.safetensors", MaskPolicy::Release),
        ("reference.two-images.safetensors", MaskPolicy::Image),
        ("reference.batch2.safetensors", MaskPolicy::Image),
        ("reference.text.safetensors", MaskPolicy::Release),
    ] {
        let inputs = reference_inputs(&model, "lm-mha", file);
        let cached = model.generate_greedy(&inputs, policy, 24).unwrap();
        let full = model
            .decode(&inputs, TokenChooser::GREEDY, policy, 24, Stepping::Uncached, |_| Flow::Continue)
            .unwrap()
            .ids_tensor()
            .unwrap();
        println!("{file} {policy:?}: {:?}", Vec::<i64>::try_from(cached.flatten(0, -1)).unwrap());
        assert!(cached.size()[1] > 2, "{file}: too few tokens to test anything");
        assert!(cached.equal(&full), "{file} {policy:?}: cached {cached} vs full {full}");
    }
}

#[test]
fn a_cache_that_grows_in_small_chunks_decodes_the_same() {
    let model = load("lm-gqa");
    let inputs = reference_inputs(&model, "lm-gqa", "reference.safetensors");
    let expected = model.generate_greedy(&inputs, MaskPolicy::Release, 16).unwrap();
    // Room for 10 positions, then 3 at a time: the prefill and most steps grow it.
    let mut cache = model.new_cache(1, 10).unwrap().with_grow_by(3);
    let mut steps = 0;
    let ids = model
        .decode(&inputs, TokenChooser::GREEDY, MaskPolicy::Release, 16, Stepping::Cached(&mut cache), |_| {
            steps += 1;
            Flow::Continue
        })
        .unwrap()
        .ids_tensor()
        .unwrap();
    assert!(ids.equal(&expected));
    assert_eq!(steps, 16);
    assert_eq!(cache.len(), 676 + 15);
    assert!(cache.capacity() >= cache.len() && cache.capacity() < cache.len() + 3);
}

#[test]
// Image spans are a list of ranges per row; one-element lists are the point here.
#[allow(clippy::single_range_in_vec_init)]
fn the_release_mask_and_the_image_positions_differ_where_expected() {
    let model = load("lm-mha");
    // image-long: the image is at 35 but has 80 tokens, the release's span is [35, 675).
    let long = reference_inputs(&model, "lm-mha", "reference.safetensors");
    assert!(policies_differ(&long.image_spans, 676));
    let at5 = reference_inputs(&model, "lm-mha", "reference.image-at-5.safetensors");
    assert_eq!(at5.image_spans, vec![vec![5..85]]);
    assert!(policies_differ(&at5.image_spans, 91));
    // A 640-token image right after 35 text tokens, as the release's llava_v1 prompt: identical.
    assert!(!policies_differ(&[vec![35..675]], 700));
    // No image and fewer than 36 positions: all language either way.
    assert!(!policies_differ(&[vec![]], 30));
    assert!(!ArcanaModel::mask_policies_differ(&reference_inputs(&model, "lm-mha", "reference.text.safetensors")));
}

#[test]
fn splice_rejects_feature_counts_that_do_not_match_the_placeholders() {
    let model = load("lm-mha");
    let features = Tensor::zeros([1, 80, 64], (Kind::Float, Device::Cpu));
    let two = Tensor::zeros([2, 80, 64], (Kind::Float, Device::Cpu));
    let lm = &model.llm.model;
    let err = splice(lm, &[vec![1, 5, -200, 7, -200]], Some(&features), None).err().expect("2 placeholders, 1 image");
    assert!(err.to_string().contains("1 image(s) given for 2 placeholder(s)"), "{err}");
    assert!(splice(lm, &[vec![1, 5, -200, 7]], Some(&two), None).is_err());
    assert!(splice(lm, &[vec![1, 5, -200, 7]], None, None).is_err());
    assert!(splice(lm, &[vec![1, 500]], None, None).is_err(), "id outside the vocabulary");
    // A row without a placeholder takes an image slot of its own, as in the release.
    let s = splice(lm, &[vec![1, -200, 4], vec![1, 2, 3]], Some(&two), Some(2048)).unwrap();
    assert_eq!(s.lengths, vec![82, 3]);
    assert_eq!(s.inputs_embeds.size(), vec![2, 82, 64]);
    // tokenizer_model_max_length cuts rows and their image spans.
    let cut = splice(lm, &[vec![1, 2, -200, 4]], Some(&features), Some(50)).unwrap();
    assert_eq!(cut.lengths, vec![50]);
    assert_eq!(cut.image_spans, vec![vec![2..50]]);
    let (ids, mask) = pad_rows(&[vec![1, 2, 3], vec![1]], 0).unwrap();
    assert_eq!(Vec::<i64>::try_from(ids.flatten(0, -1)).unwrap(), vec![1, 2, 3, 1, 0, 0]);
    assert_eq!(Vec::<i64>::try_from(mask.flatten(0, -1)).unwrap(), vec![1, 1, 1, 1, 0, 0]);
}
