//! `arcana-convert` writes tokenizer.json from tokenizer.model as transformers 4.37.2 does
//! (`LlamaTokenizerFast.from_pretrained(dir, from_slow=True).save_pretrained`). The reference is made
//! with the project's Python environment; those tests skip with a message without it.
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../../tests/common/files.rs"]
mod common;

/// The tiny checkpoint fixture plus `tokenizer.model` (when given) and `tokenizer_config.json`.
fn input_with(tmp: &Path, model: Option<&Path>, config: &serde_json::Value) -> PathBuf {
    let input = tmp.join("input");
    common::copy_dir(&common::fixture_dir("vision-linear"), &input);
    if let Some(model) = model {
        std::fs::copy(model, input.join("tokenizer.model")).unwrap();
    }
    std::fs::write(input.join("tokenizer_config.json"), config.to_string()).unwrap();
    input
}

/// Runs the converter; returns whether it succeeded and its stderr.
fn convert(input: &Path, output: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_arcana-convert"))
        .args(["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stderr)
}

fn mistral_model() -> Option<PathBuf> {
    let path =
        PathBuf::from(std::env::var_os("HOME")?).join(".cache/arcana/tokenizers/mistral-7b-v0.1-tokenizer.model");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipping: {} is missing (run scripts/setup-python.sh)", path.display());
        None
    }
}

/// Saves transformers' tokenizer.json for `converted`'s tokenizer.model and tokenizer_config.json
/// into argv[2], then checks that the converted file encodes like the slow tokenizer (legacy).
const REFERENCE: &str = r#"
import os, shutil, sys, warnings
warnings.filterwarnings("ignore")
import transformers
transformers.logging.set_verbosity_error()
from transformers import LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast
converted, work = sys.argv[1], sys.argv[2]
src = os.path.join(work, "src")
os.makedirs(src)
for name in ("tokenizer.model", "tokenizer_config.json"):
    shutil.copy(os.path.join(converted, name), src)
LlamaTokenizerFast.from_pretrained(src, from_slow=True).save_pretrained(os.path.join(work, "out"))
slow = LlamaTokenizer.from_pretrained(src, legacy=True)
fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(converted, "tokenizer.json"))
texts = ["Hello world", "  two leading spaces", "a\nb\tc  d", "日本語のテキスト", "llama 🦙 emoji",
         "x<s>y </s> z", "USER: <image>\nWhat is shown? ASSISTANT:", "1234567 numbers", "ends with space "]
# A `normalized` special token is matched in the normalized text, so "x<s>y" keeps it as text in the
# fast tokenizer (transformers' own file does the same); the slow one always splits it out.
normalized = any(t.normalized for t in fast.added_tokens_decoder.values())
for text in texts:
    if normalized and "<s>" in text:
        continue
    a, b = slow.encode(text), fast.encode(text)
    assert a == b, (text, a, b)
print("encoded the texts alike")
"#;

fn assert_matches_transformers(python: &Path, model: &Path, config: serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let input = input_with(tmp.path(), Some(model), &config);
    let output = tmp.path().join("converted");
    let (ok, stderr) = convert(&input, &output);
    assert!(ok, "conversion failed: {stderr}");
    let work = tmp.path().join("reference");
    let out = Command::new(python).arg("-c").arg(REFERENCE).arg(&output).arg(&work).output().unwrap();
    assert!(out.status.success(), "{}\nconverter: {stderr}", String::from_utf8_lossy(&out.stderr));
    let read = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let ours = read(output.join("tokenizer.json"));
    let theirs = read(work.join("out/tokenizer.json"));
    for key in ["added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model"] {
        assert!(ours[key] == theirs[key], "{}: `{key}` differs from transformers' ({config})", model.display());
    }
    assert!(ours == theirs, "{}: tokenizer.json differs from transformers' ({config})", model.display());
}

/// The release's tokenizer_config.json, and a Llama-2-hf style one that adds EOS too.
fn configs() -> [serde_json::Value; 2] {
    let token = |c: &str, normalized: bool| {
        serde_json::json!({"__type": "AddedToken", "content": c, "lstrip": false, "normalized": normalized,
                           "rstrip": false, "single_word": false})
    };
    [
        serde_json::json!({"add_bos_token": true, "add_eos_token": false, "bos_token": token("<s>", false),
            "eos_token": token("</s>", false), "unk_token": token("<unk>", false), "legacy": false,
            "pad_token": null, "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}),
        serde_json::json!({"add_eos_token": true, "bos_token": token("<s>", true), "eos_token": token("</s>", true),
            "unk_token": token("<unk>", true), "pad_token": token("<unk>", true)}),
    ]
}

#[test]
fn mistral_tokenizer_json_equals_transformers() {
    let (Some(python), Some(model)) = (common::python_with("transformers, sentencepiece"), mistral_model()) else {
        return;
    };
    for config in configs() {
        assert_matches_transformers(&python, &model, config);
    }
}

#[test]
fn llama2_tokenizer_json_equals_transformers() {
    let model = Path::new("/work/shared/tokenizers/llama2-tokenizer.model");
    if !model.is_file() {
        eprintln!("skipping: {} is not on this machine", model.display());
        return;
    }
    let Some(python) = common::python_with("transformers, sentencepiece") else { return };
    for config in configs() {
        assert_matches_transformers(&python, model, config);
    }
}

#[test]
fn a_corrupt_tokenizer_model_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = input_with(tmp.path(), None, &serde_json::json!({}));
    std::fs::write(input.join("tokenizer.model"), b"\x0a\xff\xff\xff\xff not a model").unwrap();
    let output = tmp.path().join("converted");
    let (ok, stderr) = convert(&input, &output);
    assert!(!ok && !output.exists(), "a corrupt tokenizer.model was accepted");
    let named = input.join("tokenizer.model").display().to_string();
    assert!(stderr.contains(&named), "the error does not name {named}: {stderr}");
}

/// Configurations whose tokenizer.json this converter does not reproduce, with what the message names.
#[test]
fn a_configuration_outside_the_reproduced_set_writes_no_tokenizer_json() {
    let Some(model) = mistral_model() else { return };
    let flags = serde_json::json!({"lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    let token = |content: &str, extra: serde_json::Value| {
        let mut t = flags.clone();
        t["content"] = content.into();
        t.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        t
    };
    let cases = [
        (serde_json::json!({"pad_token": "<pad>"}), "<pad>"),
        (serde_json::json!({"bos_token": token("<s>", serde_json::json!({}))}), "__type"),
        (serde_json::json!({"bos_token": {"__type": "AddedToken", "content": "<s>"}}), "four flags"),
        (serde_json::json!({"additional_special_tokens": ["<s>"]}), "additional special tokens"),
        (
            serde_json::json!({"added_tokens_decoder": {"1": token("</s>", serde_json::json!({"special": true}))}}),
            "at id 2",
        ),
    ];
    for (config, named) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let input = input_with(tmp.path(), Some(&model), &config);
        let output = tmp.path().join("converted");
        let (ok, stderr) = convert(&input, &output);
        assert!(ok, "conversion failed ({config}): {stderr}");
        assert!(!output.join("tokenizer.json").exists() && output.join("tokenizer.model").is_file(), "{config}");
        assert!(stderr.contains("not writing tokenizer.json") && stderr.contains(named), "{config}: {stderr}");
    }
}

#[test]
fn a_malformed_tokenizer_config_is_an_error_naming_it() {
    let Some(model) = mistral_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"added_tokens_decoder": {"one": {"content": "<s>"}}});
    let input = input_with(tmp.path(), Some(&model), &config);
    let output = tmp.path().join("converted");
    let (ok, stderr) = convert(&input, &output);
    assert!(!ok && !output.exists(), "a malformed tokenizer_config.json was accepted: {stderr}");
    assert!(stderr.contains("tokenizer_config.json") && stderr.contains("added_tokens_decoder"), "{stderr}");
}

#[test]
fn a_source_tokenizer_json_is_copied_not_remade() {
    let Some(model) = mistral_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let input = input_with(tmp.path(), Some(&model), &serde_json::json!({}));
    std::fs::write(input.join("tokenizer.json"), "{\"source\": true}").unwrap();
    let output = tmp.path().join("converted");
    let (ok, stderr) = convert(&input, &output);
    assert!(ok, "conversion failed: {stderr}");
    assert_eq!(std::fs::read_to_string(output.join("tokenizer.json")).unwrap(), "{\"source\": true}");
}

/// The 5,000 fuzzed strings of the library's tokenizer tests.
fn corpus() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/strings.jsonl");
    std::fs::read_to_string(&path)
        .unwrap()
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The converter's tokenizer.json, loaded through the `tokenizers` crate, encodes the corpus as the
/// slow tokenizer (legacy=True) of the same tokenizer.model does, and decodes it alike up to the
/// leading spaces, where transformers' two classes differ: the fast decoder strips one space, the
/// slow one the first token's U+2581 and then SentencePiece's dummy prefix (the library's tokenizer
/// tests check each class against transformers itself).
fn assert_round_trip(model: &Path) {
    use arcana::tokenizer::{Tokenizer, TokenizerKind, TokenizerOptions};
    let tmp = tempfile::tempdir().unwrap();
    let input = input_with(tmp.path(), Some(model), &configs()[0]);
    let output = tmp.path().join("converted");
    let (ok, stderr) = convert(&input, &output);
    assert!(ok, "conversion failed: {stderr}");
    let fast = Tokenizer::from_folder_as(&output, TokenizerKind::Fast).unwrap();
    assert_eq!(fast.kind(), TokenizerKind::Fast);
    let slow =
        Tokenizer::from_model_file(model, TokenizerOptions { legacy: Some(true), ..Default::default() }).unwrap();
    let (mut encoded, mut decoded, mut decoded_but_leading_spaces, mut failures) = (0, 0, 0, Vec::new());
    let strings = corpus();
    for text in &strings {
        let ids = slow.encode(text);
        if fast.encode(text) == ids {
            encoded += 1;
        } else if failures.len() < 8 {
            failures.push(format!("encode {text:?}: {:?} vs slow {ids:?}", fast.encode(text)));
        }
        let (fast_text, slow_text) = (fast.decode(&ids).unwrap(), slow.decode(&ids).unwrap());
        if fast_text == slow_text {
            decoded += 1;
        } else if fast_text.trim_start_matches(' ') == slow_text.trim_start_matches(' ') {
            decoded_but_leading_spaces += 1;
        } else if failures.len() < 8 {
            failures.push(format!("decode {ids:?}: {:?} vs slow {:?}", fast.decode(&ids), slow.decode(&ids)));
        }
    }
    println!(
        "{}: encode {encoded}/{n} equal to the slow tokenizer; decode {decoded}/{n} equal, {decoded_but_leading_spaces} more up to leading spaces",
        model.display(),
        n = strings.len()
    );
    assert!(failures.is_empty(), "{}:\n{}", model.display(), failures.join("\n"));
}

#[test]
fn mistral_tokenizer_json_round_trips_through_the_tokenizers_crate() {
    let Some(model) = mistral_model() else { return };
    assert_round_trip(&model);
}

#[test]
fn llama2_tokenizer_json_round_trips_through_the_tokenizers_crate() {
    let model = Path::new("/work/shared/tokenizers/llama2-tokenizer.model");
    if !model.is_file() {
        eprintln!("skipping: {} is not on this machine", model.display());
        return;
    }
    assert_round_trip(model);
}
