//! Strict loading: a damaged checkpoint fails with an error naming the tensor or the file.
//! Each case copies the committed tiny checkpoint (made by `python parity/export.py fixtures`),
//! damages one thing and loads the vision side.
mod common;

use arcana::model::VisionSide;
use arcana::Error;
use common::{copy_dir, fixture_dir};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const VISION_FILE: &str = "clip-qladder-tiny/model.safetensors";
const MAIN_FILE: &str = "model.safetensors";
const VISION_PREFIX: &str = "model.vision_tower.vision_tower.";

fn load(dir: &Path) -> Result<(), Error> {
    VisionSide::load_standalone(dir, Kind::Float, Device::Cpu).map(|_| ())
}

/// A copy of the fixture whose main checkpoint also holds every vision tensor, shifted by 1 so that
/// the release's override of the vision folder's weights is observable.
fn damaged_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir("vision-d4-sel-2"), tmp.path());
    let vision = Tensor::read_safetensors(tmp.path().join(VISION_FILE)).unwrap();
    rewrite(&tmp.path().join(MAIN_FILE), |main| {
        main.retain(|(n, _)| !n.starts_with(VISION_PREFIX));
        main.extend(vision.into_iter().map(|(n, t)| (format!("{VISION_PREFIX}{n}"), t + 1.0)));
    });
    tmp
}

/// Rewrites a safetensors file after `edit` changes its tensor list.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = Tensor::read_safetensors(path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn error_text(dir: &Path) -> String {
    let err = load(dir).expect_err("a damaged checkpoint must not load");
    err.to_string()
}

#[test]
fn the_undamaged_fixture_loads() {
    let tmp = damaged_copy();
    load(tmp.path()).unwrap();
}

#[test]
fn a_missing_tensor_is_named() {
    let tmp = damaged_copy();
    // The fixture keeps vision tensors in both places, so remove it from both.
    let victim = "LadderAdapters.1.mlp.fc2.weight";
    let in_main = format!("{VISION_PREFIX}{victim}");
    rewrite(&tmp.path().join(VISION_FILE), |t| t.retain(|(n, _)| n != victim));
    rewrite(&tmp.path().join(MAIN_FILE), |t| t.retain(|(n, _)| *n != in_main));
    let text = error_text(tmp.path());
    assert!(text.contains("missing tensor") && text.contains(&in_main), "{text}");
}

#[test]
fn an_unknown_tensor_is_named_with_its_file() {
    let tmp = damaged_copy();
    rewrite(&tmp.path().join(VISION_FILE), |t| {
        t.push(("vision_model.extra.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))))
    });
    let text = error_text(tmp.path());
    assert!(text.contains("unexpected tensor `vision_model.extra.weight`") && text.contains(VISION_FILE), "{text}");
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let tmp = damaged_copy();
    let victim = format!("{VISION_PREFIX}vision_model.pre_layrnorm.weight");
    rewrite(&tmp.path().join(MAIN_FILE), |t| {
        for (name, tensor) in t.iter_mut() {
            if *name == victim {
                *tensor = Tensor::ones([3], (Kind::Float, Device::Cpu));
            }
        }
    });
    let text = error_text(tmp.path());
    assert!(text.contains(&victim) && text.contains("shape [3]") && text.contains(MAIN_FILE), "{text}");
}

#[test]
fn a_truncated_file_is_reported_as_such() {
    let tmp = damaged_copy();
    let path = tmp.path().join(VISION_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let text = error_text(tmp.path());
    assert!(text.contains(VISION_FILE) && text.contains("truncated"), "{text}");
}

#[test]
fn a_shard_index_naming_a_missing_file_is_reported() {
    let tmp = damaged_copy();
    let main = tmp.path().join("model.safetensors");
    let names: Vec<String> = Tensor::read_safetensors(&main).unwrap().into_iter().map(|(n, _)| n).collect();
    let shard = "model-00001-of-00002.safetensors";
    std::fs::rename(&main, tmp.path().join(shard)).unwrap();
    let mut map = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let file = if i == 0 { "model-00002-of-00002.safetensors" } else { shard };
        map.insert(name.clone(), file.into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let text = error_text(tmp.path());
    assert!(text.contains("model-00002-of-00002.safetensors") && text.contains("does not exist"), "{text}");
}

/// The release's other folder forms are named with what to do: a PyTorch checkpoint is converted,
/// training output (a projector alone, or LoRA) needs its base model.
#[test]
fn a_folder_in_another_release_form_says_how_to_load_it() {
    for (file, wanted) in [
        ("pytorch_model.bin", "arcana-convert --input DIR --output NEW_DIR"),
        ("mm_projector.bin", "--model-base BASE"),
        ("non_lora_trainables.bin", "--model-base BASE"),
    ] {
        let tmp = damaged_copy();
        std::fs::rename(tmp.path().join(MAIN_FILE), tmp.path().join(file)).unwrap();
        let text = error_text(tmp.path());
        assert!(text.contains("no model.safetensors") && text.contains(wanted), "{file}: {text}");
    }
}

#[test]
fn a_malformed_config_names_the_file() {
    let tmp = damaged_copy();
    std::fs::write(tmp.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let text = error_text(tmp.path());
    assert!(text.contains("config.json") && text.contains("invalid JSON"), "{text}");
}

#[test]
fn a_config_field_of_the_wrong_type_is_named() {
    let tmp = damaged_copy();
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_attention_heads"] = "four".into();
    std::fs::write(&path, config.to_string()).unwrap();
    let text = error_text(tmp.path());
    assert!(text.contains("`num_attention_heads`"), "{text}");
}

#[test]
fn impossible_config_values_are_rejected_by_field() {
    for (field, value, expect) in [
        ("num_attention_heads", serde_json::json!(7), "not divisible"),
        ("mm_projector_type", serde_json::json!("mlp2x_relu"), "unknown projector type"),
        ("mm_vision_select_layer", serde_json::json!(-9), "out of range"),
        ("mm_vision_select_layer", serde_json::json!(4), "out of range"),
    ] {
        let tmp = damaged_copy();
        let path = tmp.path().join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[field] = value.clone();
        std::fs::write(&path, config.to_string()).unwrap();
        let text = error_text(tmp.path());
        assert!(text.contains(&format!("`{field}`")) && text.contains(expect), "{field}={value}: {text}");
    }
}

#[test]
fn main_checkpoint_weights_override_the_vision_folder() {
    // `damaged_copy` stores different values for each vision tensor in both places; the main one must win.
    let tmp = damaged_copy();
    let (_, side) = VisionSide::load_standalone(tmp.path(), Kind::Float, Device::Cpu).unwrap();
    let main = Tensor::read_safetensors(tmp.path().join("model.safetensors")).unwrap();
    let (_, expected) = main
        .iter()
        .find(|(n, _)| n == "model.vision_tower.vision_tower.qladder_embeds")
        .expect("damaged_copy puts the vision tensors in the main checkpoint");
    assert!(side.tower.ladder.qladder_embeds.equal(expected));
}

/// Points the copy's `mm_vision_tower` at `tower`.
fn set_vision_tower(dir: &Path, tower: &str) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["mm_vision_tower"] = serde_json::Value::from(tower);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn a_training_machine_vision_tower_path_falls_back_to_the_folder_of_that_name() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir("vision-d4-sel-2"), tmp.path());
    let elsewhere = "/home/trainer/no-such-checkpoints/clip-qladder-tiny";
    assert!(!Path::new(elsewhere).exists());
    set_vision_tower(tmp.path(), elsewhere);
    load(tmp.path()).expect("the model folder's clip-qladder-tiny is used");
}

#[test]
fn a_missing_vision_tower_names_every_place_tried() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir("vision-d4-sel-2"), tmp.path());
    let elsewhere = "/home/trainer/no-such-checkpoints/clip-missing-tower";
    set_vision_tower(tmp.path(), elsewhere);
    let err = error_text(tmp.path());
    let inside = tmp.path().join("clip-missing-tower").display().to_string();
    assert!(err.contains("mm_vision_tower") && err.contains(elsewhere) && err.contains(&inside), "{err}");

    let relative = "towers/clip-missing-tower";
    set_vision_tower(tmp.path(), relative);
    let err = error_text(tmp.path());
    let places = [tmp.path().join(relative), Path::new(relative).to_path_buf(), tmp.path().join("clip-missing-tower")];
    for place in places {
        assert!(err.contains(&format!("{}", place.display())), "{err} lacks {}", place.display());
    }
}
