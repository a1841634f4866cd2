//! A decoder split over several sites computes what the unsplit one does, on the committed lm-mha fixture
//! (2 layers, CPU). Without a GPU, a split by `--device-map "cpu=0-0,cpu=1-1"` has two CPU placements and
//! must give the unsplit model's logits bit for bit and its greedy ids; a split whose second layer
//! computes in fp64 makes the hand-over real (weights loaded to that site, hidden states, masks, rotary
//! tables and KV cache converted there and back), and must stay within fp32 rounding of the unsplit model.
mod common;

use arcana::generate::{Flow, Stepping, TokenChooser};
use arcana::llm::llama::{DecoderSites, Site};
use arcana::llm::placement::{LayerMap, Place, Placement, Plan};
use arcana::mm::splice::Spliced;
use arcana::mm::visual_span::MaskPolicy;
use arcana::model::{ArcanaModel, ModelFiles};
use arcana::parity::Reference;
use arcana::quant::WeightForms;
use common::fixture_dir;
use tch::{Device, Kind, Tensor};

const PRESET: &str = "lm-mha";

fn files() -> ModelFiles {
    ModelFiles::open(&fixture_dir(PRESET)).unwrap()
}

fn load(sites: &DecoderSites) -> ArcanaModel {
    ArcanaModel::load_on(files(), sites, WeightForms::default(), |_, _| {}).unwrap()
}

fn unsplit() -> ArcanaModel {
    ArcanaModel::load(&fixture_dir(PRESET), Kind::Float, Device::Cpu).unwrap()
}

fn split_by_map(map: &str) -> ArcanaModel {
    let plan = LayerMap::parse(map).unwrap().plan(2).unwrap();
    load(&DecoderSites::from_plan(&plan, Kind::Float))
}

/// The padded batch: two rows, one image each, a padding mask that every placement needs.
fn inputs(model: &ArcanaModel) -> Spliced {
    let reference = Reference::open(&fixture_dir(PRESET).join("reference.batch2.safetensors")).unwrap();
    let ids = reference.tensor("input.input_ids").unwrap();
    let mask = reference.tensor("input.attention_mask").unwrap();
    let pixels = reference.tensor("input.pixel_values").unwrap();
    model.prepare_inputs(&ids, Some(&mask), Some(&pixels)).unwrap()
}

fn greedy(model: &ArcanaModel, stepping: Stepping) -> Tensor {
    let inputs = inputs(model);
    model
        .decode(&inputs, TokenChooser::GREEDY, MaskPolicy::Image, 12, stepping, |_| Flow::Continue)
        .unwrap()
        .ids_tensor()
        .unwrap()
}

fn cached_greedy(model: &ArcanaModel) -> Tensor {
    let s = inputs(model).inputs_embeds.size();
    let mut cache = model.new_cache(s[0], s[1] + 12).unwrap();
    greedy(model, Stepping::Cached(&mut cache))
}

#[test]
fn two_cpu_placements_give_the_unsplit_logits_bit_for_bit_and_its_ids() {
    let (whole, split) = (unsplit(), split_by_map("cpu=0-0,cpu=1-1"));
    let (a, b) = (inputs(&whole), inputs(&split));
    assert!(a.inputs_embeds.equal(&b.inputs_embeds));
    let (pa, pb) =
        (whole.prefill(&a, MaskPolicy::Image, true).unwrap(), split.prefill(&b, MaskPolicy::Image, true).unwrap());
    for (i, (x, y)) in pa.decoder.layers.iter().zip(&pb.decoder.layers).enumerate() {
        assert!(x.equal(y), "layer {i} differs");
    }
    assert!(pa.logits.equal(&pb.logits), "logits differ");
    let expected = cached_greedy(&whole);
    assert!(expected.size()[1] > 4, "too few tokens to compare: {expected}");
    assert!(cached_greedy(&split).equal(&expected));
    assert!(greedy(&split, Stepping::Uncached).equal(&expected));
    // Entries out of order, one layer each: the same layers on the same placements.
    assert!(cached_greedy(&split_by_map("cpu=1,cpu=0")).equal(&expected));
}

/// Layer 1 in fp64: its weights, KV cache, mask and rotary tables live in fp64, the hidden states are
/// widened on the way in and rounded back to fp32 for the head.
fn fp64_second_layer() -> DecoderSites {
    let f32 = Site { kind: Kind::Float, device: Device::Cpu };
    DecoderSites { front: f32, layers: vec![f32, Site { kind: Kind::Double, device: Device::Cpu }], head: f32 }
}

#[test]
fn a_layer_on_another_site_gets_its_weights_cache_and_inputs_there() {
    let sites = fp64_second_layer();
    assert!(sites.is_split());
    let split = load(&sites);
    let lm = &split.llm.model;
    assert_eq!(lm.layers[0].input_layernorm.weight.kind(), Kind::Float);
    assert_eq!(lm.layers[1].input_layernorm.weight.kind(), Kind::Double);
    assert_eq!(lm.norm.weight.kind(), Kind::Float);
    assert_eq!(split.llm.lm_head.dense().unwrap().weight.kind(), Kind::Float);
    let whole = unsplit();
    let (pa, pb) = (
        whole.prefill(&inputs(&whole), MaskPolicy::Image, true).unwrap(),
        split.prefill(&inputs(&split), MaskPolicy::Image, true).unwrap(),
    );
    assert_eq!(pb.decoder.layers[1].kind(), Kind::Double);
    assert_eq!(pb.logits.kind(), Kind::Float);
    // Layer 0 is the same computation; layer 1 and the logits differ by fp32 rounding only.
    assert!(pa.decoder.layers[0].equal(&pb.decoder.layers[0]));
    let rel = |x: &Tensor, y: &Tensor| {
        let diff = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double)).abs().max().double_value(&[]);
        diff / x.abs().max().double_value(&[])
    };
    let (layer1, logits) = (rel(&pa.decoder.layers[1], &pb.decoder.layers[1]), rel(&pa.logits, &pb.logits));
    println!("fp64 layer 1: max rel diff layer 1 {layer1:.3e}, logits {logits:.3e}");
    assert!(layer1 > 0.0, "an fp64 layer gives other low bits than fp32");
    // Measured: 3.9e-7 and 3.8e-7 of the largest value (a few fp32 ulps).
    assert!(layer1 < 1e-6 && logits < 1e-6, "layer 1 {layer1:e}, logits {logits:e}");
    assert!(cached_greedy(&split).equal(&cached_greedy(&whole)));
    assert!(greedy(&split, Stepping::Uncached).equal(&cached_greedy(&whole)));
}

#[test]
fn the_kv_cache_keeps_each_layer_on_its_site() {
    let split = load(&fp64_second_layer());
    let mut cache = split.new_cache(2, 8).unwrap();
    let inputs = inputs(&split);
    // A prefill through the cache writes each layer's keys in that layer's dtype; a wrong site fails the copy
    // or the attention product.
    split
        .decode(&inputs, TokenChooser::GREEDY, MaskPolicy::Image, 3, Stepping::Cached(&mut cache), |_| Flow::Continue)
        .unwrap();
    assert_eq!(cache.len(), inputs.inputs_embeds.size()[1] + 2);
}

#[test]
fn part_sizes_count_every_tensor_once() {
    let files = files();
    let sizes = files.part_sizes(Kind::Half).unwrap();
    assert_eq!(sizes.layers.len(), 2);
    assert_eq!(sizes.layers[0], sizes.layers[1]);
    // Final norm [64] and lm_head [128, 64] in fp16.
    assert_eq!(sizes.head, (64 + 128 * 64) * 2);
    let total: i64 = files.weight_loader(Kind::Half, Device::Cpu).unwrap().numels().values().sum();
    assert_eq!(sizes.front + sizes.layers.iter().sum::<u64>() + sizes.head, total as u64 * 2);
    assert!(sizes.front > 128 * 64 * 2, "the front holds the embeddings and the vision side");
}

#[test]
fn an_fp16_plan_with_gpus_computes_its_cpu_parts_in_fp32() {
    let plan = LayerMap::parse("cuda:0=0-0,cpu=1-1").unwrap().plan(2).unwrap();
    let sites = DecoderSites::from_plan(&plan, Kind::Half);
    assert_eq!(sites.front, Site { kind: Kind::Half, device: Device::Cuda(0) });
    assert_eq!(sites.layers[1], Site { kind: Kind::Float, device: Device::Cpu });
    assert_eq!(sites.head, Site { kind: Kind::Float, device: Device::Cpu });
    // Without a GPU in the plan the dtype is kept as asked (bf16 works on the CPU, fp16 is the user's call).
    let cpu = DecoderSites::from_plan(&Plan::single(Place::Cpu, 2), Kind::Half);
    assert_eq!(cpu.layers[0].kind, Kind::Half);
    assert!(!cpu.is_split());
}

#[test]
fn the_engine_refuses_maps_that_do_not_fit_the_model() {
    use arcana::engine::{Engine, EngineOptions};
    for (map, expected) in
        [("cpu=0-0", "layer(s) 1 of 0-1 on no device"), ("cpu=0-2", "names layer 2, but the model's layers are 0-1")]
    {
        let options =
            EngineOptions { placement: Placement::Map(LayerMap::parse(map).unwrap()), ..EngineOptions::default() };
        let err = Engine::load(&fixture_dir(PRESET), options).err().expect(map).to_string();
        assert!(err.contains(expected), "{map}: {err}");
    }
}
