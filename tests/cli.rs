//! The `arcana` CLI against the project's Python reference of the release's CLI flow.
//! The checkpoints, images and expected outputs are made at test time by
//! `python parity/cli_fixtures.py --out DIR` (cli-tiny preset, torch 2.0.1, transformers 4.37.2); the
//! tests skip with a message where the project's Python environment is missing.
mod common;

use common::copy_with_context;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn fixtures() -> Option<&'static Path> {
    common::cli_fixtures()
}

fn arcana(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arcana")).current_dir(dir).args(args).output().unwrap()
}

/// Runs a command expected to fail and returns its stderr, checking it did not panic.
fn failure(dir: &Path, args: &[&str]) -> String {
    let out = arcana(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

#[test]
fn every_case_equals_the_python_reference_id_for_id_and_text_for_text() {
    let Some(dir) = fixtures() else { return };
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 8, "expected the two-image, two-template, greedy/sampled and 3-turn cases");
    let mut mismatches = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut args: Vec<&str> = case["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        args.push("--json");
        let out = arcana(dir, &args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(case["expected"].as_str().unwrap())).unwrap())
                .unwrap();
        let (ours, expected) = (ours["turns"].as_array().unwrap(), expected["turns"].as_array().unwrap());
        assert_eq!(ours.len(), expected.len(), "{name}: number of turns");
        for (turn, (a, e)) in ours.iter().zip(expected).enumerate() {
            for field in ["prompt", "input_ids", "output_ids", "text", "reply"] {
                if a[field] != e[field] {
                    mismatches.push(format!("{name} turn {turn} {field}: ours {} expected {}", a[field], e[field]));
                }
            }
        }
        println!("{name}: {} turn(s) identical", ours.len());
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn a_missing_model_path_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = failure(dir.path(), &["--model-path", "no-such-model", "--prompt", "hi"]);
    assert!(err.contains("no-such-model") && err.contains("no such folder"), "{err}");
}

#[test]
fn a_missing_or_corrupt_image_is_named() {
    let Some(dir) = fixtures() else { return };
    let err =
        failure(dir, &["--model-path", "arcana-cli-tiny-v1", "--image-file", "images/none.png", "--prompt", "hi"]);
    assert!(err.contains("images/none.png"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("corrupt.png");
    let mut bytes = std::fs::read(dir.join("images/square.png")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&corrupt, bytes).unwrap();
    let err = failure(
        dir,
        &["--model-path", "arcana-cli-tiny-v1", "--image-file", corrupt.to_str().unwrap(), "--prompt", "hi"],
    );
    assert!(err.contains("corrupt.png"), "{err}");
}

#[test]
fn a_prompt_past_the_context_is_refused_with_its_length() {
    let Some(dir) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    copy_with_context(&dir.join("arcana-cli-tiny-v1"), &tmp.path().join("arcana-short-context-v1"), 64);
    let image = dir.join("images/square.png");
    let err = failure(
        tmp.path(),
        &[
            "--model-path",
            "arcana-short-context-v1",
            "--image-file",
            image.to_str().unwrap(),
            "--prompt",
            "What is in this image?",
            "--temperature",
            "0",
        ],
    );
    assert!(err.contains("leaves no room") && err.contains("context of 64"), "{err}");
}

#[test]
fn cuda_without_a_cuda_device_is_refused() {
    if tch::Cuda::device_count() > 0 {
        eprintln!("skipping: this machine has a CUDA device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("m")).unwrap();
    let err = failure(dir.path(), &["--model-path", "m", "--device", "cuda", "--prompt", "hi"]);
    assert!(err.contains("no CUDA device"), "{err}");
    let err = failure(dir.path(), &["--model-path", "m", "--device", "gpu", "--prompt", "hi"]);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

#[test]
fn contradictory_or_impossible_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("m")).unwrap();
    let err = failure(dir.path(), &["--model-path", "m", "--load-8bit", "--load-4bit", "--prompt", "hi"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = failure(dir.path(), &["--model-path", "m", "--temperature", "-1", "--prompt", "hi"]);
    assert!(err.contains("temperature"), "{err}");
    let err = failure(dir.path(), &["--model-path", "m", "--temperature", "0.5", "--top-p", "1.5", "--prompt", "hi"]);
    assert!(err.contains("top-p"), "{err}");
}

#[test]
fn a_decoder_split_over_two_cpu_placements_answers_like_the_unsplit_model() {
    let Some(dir) = fixtures() else { return };
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--model-path",
            "arcana-cli-tiny-v1",
            "--image-file",
            "images/square.png",
            "--prompt",
            "What is in this image?",
            "--prompt",
            "And then?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = arcana(dir, &args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        (value, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (whole, _) = run(&[]);
    let (split, stderr) = run(&["--device-map", "cpu=0-0,cpu=1-1"]);
    assert!(stderr.contains("placement: cpu=0-1"), "{stderr}");
    let turns = |v: &Value| v["turns"].as_array().unwrap().clone();
    assert_eq!(turns(&whole).len(), 2);
    for (a, b) in turns(&whole).iter().zip(&turns(&split)) {
        assert!(a["output_ids"].as_array().unwrap().len() > 4, "{a}");
        assert_eq!(a["output_ids"], b["output_ids"]);
        assert_eq!(a["text"], b["text"]);
    }
}

#[test]
fn a_second_turn_reuses_the_first_and_answers_as_without() {
    let Some(dir) = fixtures() else { return };
    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["--model-path", "arcana-cli-tiny-v1", "--image-file", "images/square.png"];
        args.extend(["--prompt", "What is in this image?", "--prompt", "And then?", "--prompt", "Why?"]);
        args.extend(["--temperature", "0", "--max-new-tokens", "12", "--json", "--prefill-chunk", "8"]);
        args.extend_from_slice(extra);
        let out = arcana(dir, &args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let fresh = run(&[]);
    let reusing = run(&["--reuse-cache-bytes", "1073741824"]);
    let turns = |v: &Value| v["turns"].as_array().unwrap().clone();
    assert_eq!(turns(&fresh).len(), 3);
    for (turn, (a, b)) in turns(&fresh).iter().zip(&turns(&reusing)).enumerate() {
        assert_eq!(a["output_ids"], b["output_ids"], "turn {turn}");
        assert_eq!(a["text"], b["text"], "turn {turn}");
        // Each later turn's prompt starts with the one before: reused in whole chunks of 8.
        let reused = b["reused_positions"].as_i64().unwrap();
        assert_eq!(a["reused_positions"], 0);
        assert!(if turn == 0 { reused == 0 } else { reused > 0 && reused % 8 == 0 }, "turn {turn}: {reused}");
    }
    // Past --prefill-chunk's range, or a reuse budget that is not a number: named, no panic.
    assert!(failure(dir, &["--model-path", "arcana-cli-tiny-v1", "--prefill-chunk", "0"]).contains("prefill-chunk"));
    assert!(failure(dir, &["--model-path", "arcana-cli-tiny-v1", "--reuse-cache-bytes", "lots"])
        .contains("reuse-cache-bytes"));
}

/// The compact modes keep the vision side's linears in fp16 on the CPU unless `--vision-fp32`; the
/// exact mode never does. The JSON output says which was used.
#[test]
fn compact_modes_keep_vision_linears_in_fp16_unless_asked_not_to() {
    let Some(dir) = fixtures() else { return };
    let vision_fp16 = |extra: &[&str]| {
        let mut args = vec!["--model-path", "arcana-cli-tiny-v1", "--image-file", "images/square.png"];
        args.extend_from_slice(&["--prompt", "What is in this image?", "--max-new-tokens", "4", "--json"]);
        args.extend_from_slice(extra);
        let out = arcana(dir, &args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        value["vision_fp16"].as_bool().unwrap()
    };
    assert!(!vision_fp16(&[]));
    assert!(vision_fp16(&["--load-8bit"]));
    assert!(vision_fp16(&["--dtype", "fp16"]));
    assert!(!vision_fp16(&["--load-4bit", "--vision-fp32"]));
}

#[test]
fn malformed_or_impossible_device_maps_and_memory_limits_are_refused() {
    let Some(dir) = fixtures() else { return };
    let model = ["--model-path", "arcana-cli-tiny-v1", "--prompt", "hi", "--temperature", "0"];
    for (flags, expected) in [
        (&["--device-map", "cpu=0-0"][..], "layer(s) 1 of 0-1 on no device"),
        (&["--device-map", "cpu=0-1,cpu=1-1"][..], "places layer 1 twice"),
        (&["--device-map", "cpu=0-2"][..], "names layer 2, but the model's layers are 0-1"),
        (&["--device-map", "gpu=0-1"][..], "unknown device `gpu`"),
        (&["--device-map", "cpu:0-1"][..], "expected DEVICE=FIRST-LAST"),
        (&["--device-map", "cuda:99=0-1"][..], "names cuda:99, but"),
        (&["--device-map", "cpu=0-1", "--device", "cpu"][..], "cannot be used with"),
        (&["--max-gpu-memory", "0:20XB", "--device", "cuda"][..], "unknown unit `XB`"),
        (&["--max-gpu-memory", "0:20GiB"][..], "use it with --device cuda"),
    ] {
        let args: Vec<&str> = model.iter().chain(flags).copied().collect();
        let err = failure(dir, &args);
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
}

#[test]
fn a_projector_checkpoint_with_model_base_answers_like_the_full_one() {
    let Some(dir) = fixtures() else { return };
    if !Path::new(env!("CARGO_BIN_EXE_arcana")).with_file_name("arcana-convert").is_file() {
        eprintln!("skipping: arcana-convert is not built (cargo test --workspace builds it)");
        return;
    }
    let python = common::python_with_torch().expect("fixtures need it");
    let tmp = tempfile::tempdir().unwrap();
    // The folder name keeps "v1" so the release's rule picks the same template.
    let projector = tmp.path().join("arcana-cli-tiny-projector-v1");
    std::fs::create_dir(&projector).unwrap();
    std::fs::copy(dir.join("arcana-cli-tiny-v1/config.json"), projector.join("config.json")).unwrap();
    let script = r#"
import os, sys, torch
from safetensors.torch import load_file
sd = load_file(os.path.join(sys.argv[1], "model.safetensors"))
torch.save({k: v for k, v in sd.items() if k.startswith("model.mm_projector.")}, os.path.join(sys.argv[2], "mm_projector.bin"))
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dir.join("arcana-cli-tiny-v1"))
        .arg(&projector)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let base = dir.join("arcana-cli-tiny-v1");
    let image = dir.join("images/square.png");
    let args = [
        "--model-path",
        projector.to_str().unwrap(),
        "--model-base",
        base.to_str().unwrap(),
        "--image-file",
        image.to_str().unwrap(),
        "--prompt",
        "What is in this image?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--json",
    ];
    let run = Command::new(env!("CARGO_BIN_EXE_arcana"))
        .env("ARCANA_CACHE", tmp.path().join("cache"))
        .args(args)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ours: Value = serde_json::from_slice(&run.stdout).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected/v1-square-greedy.json")).unwrap()).unwrap();
    // The base's projector is the same fp16 tensor, so the release's fp16 cast changes nothing.
    assert_eq!(ours["turns"][0]["output_ids"], expected["turns"][0]["output_ids"]);
}

#[test]
fn a_json_schema_constrains_the_answer_and_log_probabilities_come_with_json() {
    let Some(dir) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let schema_file = tmp.path().join("schema.json");
    let schema = serde_json::json!({"type": "object", "properties": {
        "colour": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["colour", "n"], "additionalProperties": false});
    std::fs::write(&schema_file, schema.to_string()).unwrap();
    let schema_arg = schema_file.to_str().unwrap();
    let base = ["--model-path", "arcana-cli-tiny-v1", "--temperature", "0", "--prompt", "Colour?", "--json"];
    let out = arcana(dir, &[&base[..], &["--json-schema", schema_arg, "--logprobs", "2"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let turns: Value = serde_json::from_slice(&out.stdout).unwrap();
    let turn = &turns["turns"][0];
    let answer: Value = serde_json::from_str(turn["text"].as_str().unwrap()).unwrap();
    assert!(["red", "green"].contains(&answer["colour"].as_str().unwrap()), "{answer}");
    assert!(answer["n"].as_i64().is_some_and(|n| (0..=9).contains(&n)), "{answer}");
    assert_eq!(turn["finish_reason"], "complete");
    let logprobs = turn["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len() + 1, turn["output_ids"].as_array().unwrap().len(), "one per new token");
    assert!(logprobs.iter().all(|t| t["top"].as_array().unwrap().len() == 2), "{logprobs:?}");

    let regex = arcana(dir, &[&base[..], &["--regex", "[0-9]{2}-[a-z]{3}"]].concat());
    let turns: Value = serde_json::from_slice(&regex.stdout).unwrap();
    let text = turns["turns"][0]["text"].as_str().unwrap();
    assert!(text.len() == 6 && text.as_bytes()[2] == b'-', "{text:?}");
    assert!(turns["turns"][0].get("logprobs").is_none(), "no log-probabilities unless asked");

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"type": "strin"}"#).unwrap();
    let stderr = failure(dir, &[&base[..], &["--json-schema", bad.to_str().unwrap()]].concat());
    assert!(stderr.contains("JSON schema cannot be used") && stderr.contains("strin"), "{stderr}");
    let stderr = failure(dir, &["--model-path", "arcana-cli-tiny-v1", "--logprobs", "2", "--prompt", "x"]);
    assert!(stderr.contains("--json"), "{stderr}");
    let stderr = failure(dir, &[&base[..], &["--regex", "a", "--json-schema", schema_arg]].concat());
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
