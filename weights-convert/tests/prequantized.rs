//! Pre-quantized folders (`arcana-convert --quantize`): a folder loads as the source quantized at load
//! does, bit for bit (prompt logits and every decoding step's logits), and a folder that is truncated,
//! rewritten, of another version or asked for in another mode is refused by name before any weight is
//! used. On the committed lm-mha fixture (made by `python parity/export.py fixtures`).
use arcana::llm::mmlora::Branch;
use arcana::mm::visual_span::MaskPolicy;
use arcana::model::ArcanaModel;
use arcana::parity::Reference;
use arcana::quant::prequantized::MANIFEST_FILE;
use arcana::quant::{LinearStorage, Quantization, WeightForms};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

#[path = "../../tests/common/files.rs"]
mod common;

fn source() -> PathBuf {
    common::fixture_dir("lm-mha")
}

fn quantize(output: &Path, mode: &str, extra: &[&str]) {
    let input = source();
    let mut args = vec!["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--quantize", mode];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_arcana-convert")).args(&args).output().unwrap();
    assert!(out.status.success(), "arcana-convert {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn load(dir: &Path, forms: WeightForms) -> arcana::Result<ArcanaModel> {
    ArcanaModel::load_with_progress(dir, Kind::Float, Device::Cpu, forms, |_, _| {})
}

/// The prompt's logits, then each greedy step's logits over `steps` cached steps.
fn logits_of(model: &ArcanaModel, steps: usize) -> Vec<Tensor> {
    let reference = Reference::open(&source().join("reference.safetensors")).unwrap();
    let ids = reference.tensor("input.input_ids").unwrap();
    let pixels = reference.tensor("input.pixel_values").unwrap();
    let inputs = model.prepare_inputs(&ids, None, Some(&pixels)).unwrap();
    let mut all = vec![model.prefill(&inputs, MaskPolicy::Release, false).unwrap().logits];
    let length = inputs.inputs_embeds.size()[1];
    let mut cache = model.new_cache(1, length + steps as i64).unwrap();
    let first = model.first_step(&inputs, MaskPolicy::Release, &mut cache).unwrap();
    let (mut mask, mut logits) = (first.mask, first.logits);
    let visual = Tensor::zeros([1, 1], (Kind::Bool, Device::Cpu));
    for _ in 0..steps {
        let next = logits.argmax(-1, false).int64_value(&[0]);
        mask = Tensor::cat(&[&mask, &Tensor::ones([1, 1], (Kind::Int64, Device::Cpu))], 1);
        logits = model.token_step(&[next], &mask, &visual, &mut cache).unwrap();
        all.push(logits.shallow_clone());
    }
    all
}

#[test]
fn a_prequantized_folder_computes_what_quantizing_at_load_computes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("int8", Quantization::Int8, true),
        ("int4", Quantization::Int4, true),
        ("fp16", Quantization::Fp16, true),
        ("int8", Quantization::Int8, false),
        ("int4", Quantization::Int4, false),
    ];
    for (name, mode, merge_lora) in cases {
        let folder = dir.path().join(format!("{name}-{merge_lora}"));
        let flags: &[&str] = if merge_lora { &["--merge-lora", "--verify"] } else { &["--verify"] };
        quantize(&folder, name, flags);
        // The folder stores the compact branches in fp16 (read in place, or made into int8 codes).
        let file = arcana::weights::TensorFile::open(&folder.join("model.safetensors")).unwrap();
        let lora: Vec<String> = file.names().filter(|n| Branch::of_weight(n).is_some()).map(String::from).collect();
        assert!(!lora.is_empty());
        for tensor in &lora {
            let compact = Branch::of_weight(tensor).unwrap().storage(Some(mode), merge_lora) != LinearStorage::Dense;
            let want = if compact { safetensors::Dtype::F16 } else { safetensors::Dtype::F32 };
            assert_eq!(file.dtype(tensor), Some(want), "{tensor} in the {name} folder, merge={merge_lora}");
        }
        let at_load = WeightForms { storage: Some(mode), merge_lora, vision: LinearStorage::Fp16, prequantized: false };
        let expected = load(&source(), at_load).unwrap();
        // No weight flags: the folder's own mode; the same flags are accepted too.
        for asked in [WeightForms::default(), WeightForms { storage: Some(mode), ..WeightForms::default() }] {
            let folder_model = load(&folder, asked).unwrap();
            assert!(folder_model.forms.prequantized && folder_model.forms.storage == Some(mode));
            assert_eq!(folder_model.forms.vision, LinearStorage::Fp16);
            assert_eq!(folder_model.llm.language_merged(), merge_lora);
            let bytes = |m: &ArcanaModel| m.base_weights().map(|w| w.bytes()).sum::<usize>();
            assert_eq!(bytes(&folder_model), bytes(&expected), "{name} merge={merge_lora}");
            // The branches that run at image positions only are kept compact on both paths: fp16
            // beside fp16 projections, int8 beside int8 and int4 ones.
            for model in [&folder_model, &expected] {
                for (branch, weights) in model.llm.projections().flat_map(|p| p.branches()) {
                    let storage = branch.storage(Some(mode), merge_lora);
                    assert!((storage != LinearStorage::Dense) == (branch == Branch::Visual || merge_lora));
                    let want = match storage {
                        LinearStorage::Dense => "Float",
                        LinearStorage::Fp16 => "fp16",
                        LinearStorage::Int8 => "int8",
                    };
                    assert_eq!(
                        storage == LinearStorage::Fp16,
                        mode == Quantization::Fp16 && storage != LinearStorage::Dense
                    );
                    assert!(weights.iter().all(|w| w.form() == want), "{name} merge={merge_lora}: {branch:?}");
                }
            }
            let lora = |m: &ArcanaModel| m.llm.describe_lora_branches();
            assert_eq!(lora(&folder_model), lora(&expected));
            let (got, want) = (logits_of(&folder_model, 6), logits_of(&expected, 6));
            for (step, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(a.equal(b), "{name} merge={merge_lora}: logits of step {step} differ from quantizing at load");
            }
            // The folder's vision weights are read in place: they leave memory after each image and
            // are read again from the file for the next, giving the features of copies each time.
            assert!(folder_model.vision_bytes_read_per_image() > 0, "{name}: no vision weight read in place");
            let pixels =
                Reference::open(&source().join("reference.safetensors")).unwrap().tensor("input.pixel_values").unwrap();
            let features = expected.image_features(&pixels).unwrap();
            for _ in 0..3 {
                assert!(folder_model.image_features(&pixels).unwrap().equal(&features), "{name}: image features");
            }
        }
    }
}

fn load_error(dir: &Path, forms: WeightForms) -> String {
    match load(dir, forms) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_manifest(folder: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = folder.join(MANIFEST_FILE);
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn a_damaged_or_foreign_folder_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let folder = dir.path().join(name);
        quantize(&folder, "int8", &["--merge-lora"]);
        folder
    };
    let shard = |folder: &Path| folder.join("model.safetensors");

    // Truncated: the size differs from the manifest's.
    let truncated = fresh("truncated");
    let file = std::fs::OpenOptions::new().write(true).open(shard(&truncated)).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - 100).unwrap();
    let err = load_error(&truncated, WeightForms::default());
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");

    // Rewritten header, same size: its digest differs.
    let rewritten = fresh("rewritten");
    let mut bytes = std::fs::read(shard(&rewritten)).unwrap();
    let at = bytes.windows(4).position(|w| w == b"\"pt\"").expect("the header's format");
    bytes[at + 1..at + 3].copy_from_slice(b"PT");
    std::fs::write(shard(&rewritten), &bytes).unwrap();
    let err = load_error(&rewritten, WeightForms::default());
    assert!(err.contains("model.safetensors") && err.contains("header"), "{err}");

    // Another version.
    let foreign = fresh("foreign");
    edit_manifest(&foreign, |m| m["arcana_version"] = "0.0.1".into());
    let err = load_error(&foreign, WeightForms::default());
    assert!(err.contains(MANIFEST_FILE) && err.contains("arcana 0.0.1"), "{err}");
    edit_manifest(&foreign, |m| m["format"] = "arcana-quantized/0".into());
    let err = load_error(&foreign, WeightForms::default());
    assert!(err.contains(MANIFEST_FILE) && err.contains("format") && err.contains("convert its source again"), "{err}");
    edit_manifest(&foreign, |m| m["format"] = "gguf".into());
    let err = load_error(&foreign, WeightForms::default());
    assert!(err.contains(MANIFEST_FILE) && err.contains("not a folder this arcana writes"), "{err}");

    // A listed file that is gone, and a manifest that does not parse.
    let missing = fresh("missing");
    edit_manifest(&missing, |m| m["files"][0]["name"] = "model-gone.safetensors".into());
    let err = load_error(&missing, WeightForms::default());
    assert!(err.contains("model-gone.safetensors") && err.contains("missing"), "{err}");
    std::fs::write(missing.join(MANIFEST_FILE), b"{\"format\": ").unwrap();
    let err = load_error(&missing, WeightForms::default());
    assert!(err.contains(MANIFEST_FILE) && err.contains("JSON"), "{err}");

    // Codes no CPU's int8 kernel takes.
    let codes = fresh("codes");
    edit_manifest(&codes, |m| m["int8_max_code"] = 255.into());
    let err = load_error(&codes, WeightForms::default());
    assert!(err.contains("int8 codes reach 255"), "{err}");

    // Another mode than the folder's.
    let err = load_error(&fresh("mode"), WeightForms { storage: Some(Quantization::Int4), ..WeightForms::default() });
    assert!(err.contains("pre-quantized int8 folder cannot be loaded as int4"), "{err}");
}

#[test]
fn quantizing_refuses_what_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_arcana-convert")).args(args).output().unwrap();
    let (input, out) = (source(), output.to_str().unwrap().to_string());
    let input = input.to_str().unwrap();
    for args in [
        vec!["--input", input, "--output", &out, "--quantize", "int2"],
        vec!["--input", input, "--output", &out, "--quantize", "int8", "--dtype", "bf16"],
        vec!["--input", input, "--output", &out, "--int8-portable"],
    ] {
        let result = run(&args);
        assert!(!result.status.success(), "{args:?} succeeded");
        assert!(!output.exists());
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // --int8-portable writes codes that every CPU takes.
    quantize(&output, "int8", &["--int8-portable"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest["int8_max_code"], 63);
    assert!(load(&output, WeightForms::default()).is_ok());
}
