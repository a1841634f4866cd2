//! Round trips and bad inputs for `arcana-convert`, on the committed tiny checkpoints
//! (made by `python parity/export.py fixtures`). Forms that only PyTorch writes (`.bin` archives) are
//! made here with the project's Python environment; those tests skip with a message without it.
use arcana::parity::{check, compare, outputs, Reference, Tolerance};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

#[path = "../../tests/common/files.rs"]
mod common;

fn convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arcana-convert")).args(args).output().unwrap()
}

fn convert_ok(input: &Path, output: &Path, extra: &[&str]) {
    let mut args = vec!["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--verify"];
    args.extend_from_slice(extra);
    let out = convert(&args);
    assert!(out.status.success(), "conversion failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn convert_err(input: &Path, output: &Path) -> String {
    let out = convert(&["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(!out.status.success(), "conversion of a bad input succeeded");
    assert!(!output.exists(), "a failed conversion left {}", output.display());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_no_staging_left(output.parent().unwrap());
    stderr
}

fn assert_no_staging_left(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".partial-"), "staging folder {name} left behind");
    }
}

/// The converted folder computes exactly what the original fixture folder computes (same machine, so
/// bit for bit), on the committed reference's inputs.
fn assert_vision_parity(converted: &Path, preset: &str) {
    let reference = Reference::open(&common::fixture_dir(preset).join("reference.safetensors")).unwrap();
    let original = outputs(&common::fixture_dir(preset), &reference).unwrap();
    let ours = outputs(converted, &reference).unwrap();
    assert_eq!(ours.len(), original.len(), "{preset}");
    for ((name, a), (_, b)) in ours.iter().zip(&original) {
        let report = compare(name, a, b, &Tolerance::BitIdentical).unwrap();
        assert!(report.bit_identical, "{preset}: {report:?}");
    }
}

fn run_python(python: &Path, script: &str, args: &[&Path]) {
    let out = Command::new(python).arg("-c").arg(script).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Rewrites `dir`'s model.safetensors as `pytorch_model.bin` (sharded in two with an index when asked).
const TO_BIN: &str = r#"
import json, os, sys, torch
from safetensors.torch import load_file
d, shards = sys.argv[1], int(sys.argv[2])
sd = load_file(os.path.join(d, "model.safetensors"))
os.remove(os.path.join(d, "model.safetensors"))
names = sorted(sd)
if shards == 1:
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
else:
    half = len(names) // 2
    parts = [names[:half], names[half:]]
    wm = {}
    for i, part in enumerate(parts):
        f = f"pytorch_model-0000{i+1}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, os.path.join(d, f))
        wm.update({n: f for n in part})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "pytorch_model.bin.index.json"), "w"))
"#;

#[test]
fn safetensors_folders_round_trip_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    for preset in ["vision-d4-sel-2", "vision-d3-sel-1", "vision-linear"] {
        let out = tmp.path().join(preset);
        convert_ok(&common::fixture_dir(preset), &out, &["--dtype", "fp32"]);
        assert_vision_parity(&out, preset);
        assert!(out.join("arcana-manifest.json").is_file() && out.join("vision_tower/config.json").is_file());
    }
}

#[test]
fn small_shards_and_half_precision_outputs_load() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert_ok(&common::fixture_dir("vision-d3-sel-1"), &out, &["--dtype", "fp16", "--max-shard-mb", "0"]);
    assert!(out.join("model.safetensors.index.json").is_file());
    // fp16 source, fp16 output: loading as fp32 gives the fixture's exact values.
    assert_vision_parity(&out, "vision-d3-sel-1");
}

#[test]
fn pytorch_bin_checkpoints_round_trip_bit_identically() {
    let Some(python) = common::python_with_torch() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (preset, shards) in [("vision-d4-sel-2", "1"), ("vision-d3-sel-1", "2")] {
        let input = tmp.path().join(format!("{preset}-bin"));
        common::copy_dir(&common::fixture_dir(preset), &input);
        run_python(&python, TO_BIN, &[&input, Path::new(shards)]);
        run_python(&python, TO_BIN, &[&input.join("clip-qladder-tiny"), Path::new("1")]);
        let out = tmp.path().join(format!("{preset}-out"));
        convert_ok(&input, &out, &["--dtype", "fp32"]);
        assert_vision_parity(&out, preset);
    }
}

#[test]
fn a_projector_checkpoint_with_a_base_round_trips() {
    let Some(python) = common::python_with_torch() else { return };
    // fp16 weights: the release's cast of mm_projector.bin to fp16 changes nothing, so parity holds.
    let preset = "vision-d3-sel-1";
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    common::copy_dir(&common::fixture_dir(preset), &base);
    let projector_only = tmp.path().join("projector");
    std::fs::create_dir_all(&projector_only).unwrap();
    std::fs::copy(base.join("config.json"), projector_only.join("config.json")).unwrap();
    let script = r#"
import os, sys, torch
from safetensors.torch import load_file, save_file
base, proj = sys.argv[1], sys.argv[2]
sd = load_file(os.path.join(base, "model.safetensors"))
p = {k: v for k, v in sd.items() if k.startswith("model.mm_projector.")}
assert p
torch.save(p, os.path.join(proj, "mm_projector.bin"))
# the base's own projector is different, so the override is observable
save_file({k: (v + 1 if k in p else v) for k, v in sd.items()}, os.path.join(base, "model.safetensors"))
"#;
    run_python(&python, script, &[&base, &projector_only]);
    let out = tmp.path().join("out");
    let without_base = convert(&["--input", projector_only.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&without_base.stderr).contains("--model-base"));
    convert_ok(&projector_only, &out, &["--dtype", "fp32", "--model-base", base.to_str().unwrap()]);
    assert_vision_parity(&out, preset);
}

#[test]
fn a_pickle_with_a_foreign_global_is_refused_without_running_it() {
    let Some(python) = common::python_with_torch() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    common::copy_dir(&common::fixture_dir("vision-d4-sel-2"), &input);
    let marker = tmp.path().join("executed");
    let script = r#"
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))
sd = {"model.embed_tokens.weight": torch.zeros(2), "evil": Evil()}
os.remove(os.path.join(sys.argv[1], "model.safetensors"))
torch.save(sd, os.path.join(sys.argv[1], "pytorch_model.bin"))
"#;
    run_python(&python, script, &[&input, &marker]);
    let err = convert_err(&input, &tmp.path().join("out"));
    assert!(err.contains("refused global `posix.mkdir`") && err.contains("pytorch_model.bin"), "{err}");
    assert!(!marker.exists(), "the pickle's callable ran");
}

#[test]
fn a_truncated_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    common::copy_dir(&common::fixture_dir("vision-linear"), &input);
    let shard = input.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = convert_err(&input, &tmp.path().join("out"));
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn an_index_naming_a_missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    common::copy_dir(&common::fixture_dir("vision-linear"), &input);
    std::fs::remove_file(input.join("model-00002-of-00002.safetensors")).unwrap();
    let err = convert_err(&input, &tmp.path().join("out"));
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("does not exist"), "{err}");
}

#[test]
fn a_missing_vision_tower_names_every_place_tried() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    common::copy_dir(&common::fixture_dir("vision-linear"), &input);
    set_json(&input.join("config.json"), "mm_vision_tower", "/training/machine/clip-absent".into());
    let err = convert_err(&input, &tmp.path().join("out"));
    let inside = input.join("clip-absent").display().to_string();
    assert!(err.contains("/training/machine/clip-absent") && err.contains(&inside), "{err}");
}

#[test]
fn the_same_tensor_in_two_shards_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    common::copy_dir(&common::fixture_dir("vision-linear"), &input);
    let first = input.join("model-00001-of-00002.safetensors");
    let second = input.join("model-00002-of-00002.safetensors");
    let mut tensors = Tensor::read_safetensors(&second).unwrap();
    let (dup_name, dup) = Tensor::read_safetensors(&first).unwrap().into_iter().next().unwrap();
    tensors.push((dup_name.clone(), dup));
    Tensor::write_safetensors(&tensors, &second).unwrap();
    let err = convert_err(&input, &tmp.path().join("out"));
    assert!(
        err.contains(&format!("`{dup_name}`")) && err.contains("model-00001") && err.contains("model-00002"),
        "{err}"
    );
}

/// A safetensors file with a hand-written header.
fn write_raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn overlapping_or_out_of_range_offsets_are_refused() {
    for (header, data_len, expect) in [
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            "overlap",
        ),
        (r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8, "truncated"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("input");
        common::copy_dir(&common::fixture_dir("vision-d4-sel-2"), &input);
        write_raw_safetensors(&input.join("model.safetensors"), header, data_len);
        let err = convert_err(&input, &tmp.path().join("out"));
        assert!(err.contains("model.safetensors") && err.contains(expect), "{err}");
    }
}

#[test]
fn an_unsupported_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    common::copy_dir(&common::fixture_dir("vision-d4-sel-2"), &input);
    write_raw_safetensors(
        &input.join("model.safetensors"),
        r#"{"model.norm.weight":{"dtype":"U16","shape":[4],"data_offsets":[0,8]}}"#,
        8,
    );
    let err = convert_err(&input, &tmp.path().join("out"));
    assert!(err.contains("model.norm.weight") && err.contains("U16"), "{err}");
}

#[test]
fn an_existing_output_is_kept_without_force_and_replaced_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let refused = convert(&[
        "--input",
        common::fixture_dir("vision-d4-sel-2").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert!(out.join("keep").is_file());
    convert_ok(&common::fixture_dir("vision-d4-sel-2"), &out, &["--force", "--dtype", "fp32"]);
    assert!(!out.join("keep").exists());
    assert_vision_parity(&out, "vision-d4-sel-2");
}

#[test]
fn an_interrupted_run_leaves_no_partial_folder() {
    // A checkpoint of ~400 MB so that Ctrl-C lands mid-conversion; either outcome must leave the
    // target complete or absent, never partial, and no staging folder behind.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    common::copy_dir(&common::fixture_dir("vision-d4-sel-2"), &input);
    let main = input.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&main).unwrap();
    for i in 0..50 {
        tensors.push((format!("model.extra.{i}"), Tensor::ones([2048, 1024], (Kind::Float, Device::Cpu))));
    }
    Tensor::write_safetensors(&tensors, &main).unwrap();
    let out = tmp.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_arcana-convert"))
        .args(["--input", input.to_str().unwrap(), "--output", out.to_str().unwrap(), "--verify"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    if status.success() {
        eprintln!("the conversion finished before the interrupt; checking it is complete");
        assert!(out.join("arcana-manifest.json").is_file());
    } else {
        assert!(!out.exists(), "an interrupted run left {}", out.display());
    }
    assert_no_staging_left(tmp.path());
}

// ---------------------------------------------------------------------------------------------------
// LoRA training output over --model-base, and --merge-lora
// ---------------------------------------------------------------------------------------------------

fn run_python_out(python: &Path, script: &str, args: &[&Path]) -> String {
    let out = Command::new(python).arg("-c").arg(script).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes LoRA training output over the lm-mha base (argv: base, lora dir, expected dir, adapter format):
/// `non_lora_trainables.bin` with a new projector under the trainer's `base_model.model.` names, a PEFT
/// adapter (r 4, alpha 8) on q/v/down_proj, and MM-LoRA tensors in the adapter that PEFT's loading drops.
/// `expected` gets the merge as the converter documents it (fp32: W + B @ A * alpha / r; non-LoRA tensors
/// through fp16), and the script prints how far the release's fp16 merge lands from it, rounded to fp16.
const MAKE_LORA: &str = r#"
import json, os, shutil, sys, torch
from safetensors.torch import load_file, save_file
base, lora, expected, fmt = sys.argv[1:5]
idx = json.load(open(os.path.join(base, "model.safetensors.index.json")))
sd = {}
for f in sorted(set(idx["weight_map"].values())):
    sd.update(load_file(os.path.join(base, f)))
g = torch.Generator().manual_seed(7)
os.makedirs(lora)
shutil.copy(os.path.join(base, "config.json"), lora)
non_lora = {"base_model.model." + k: torch.randn(v.shape, generator=g) * 0.05
            for k, v in sd.items() if k.startswith("model.mm_projector.")}
assert non_lora
torch.save(non_lora, os.path.join(lora, "non_lora_trainables.bin"))
r, alpha, targets = 4, 8, ["q_proj", "v_proj", "down_proj"]
adapter, pairs = {}, {}
for k, v in sd.items():
    m = k[: -len(".weight")]
    if k.endswith(".weight") and ".layers." in k and m.split(".")[-1] in targets:
        a = torch.randn(r, v.shape[1], generator=g) * 0.1
        b = torch.randn(v.shape[0], r, generator=g) * 0.1
        adapter[f"base_model.model.{m}.lora_A.weight"], adapter[f"base_model.model.{m}.lora_B.weight"] = a, b
        pairs[k] = (a, b)
adapter["base_model.model.model.layers.0.self_attn.q_proj.V_Slora_A.weight"] = torch.zeros(2, 2)
json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
           "fan_in_fan_out": False, "modules_to_save": None}, open(os.path.join(lora, "adapter_config.json"), "w"))
if fmt == "bin":
    torch.save(adapter, os.path.join(lora, "adapter_model.bin"))
else:
    save_file(adapter, os.path.join(lora, "adapter_model.safetensors"))

merged = {k: v.float() for k, v in sd.items()}
for k, v in non_lora.items():
    merged[k[len("base_model.model."):]] = v.half().float()
worst, rel, changed, total = 0.0, 0.0, 0, 0
for k, (a, b) in pairs.items():
    merged[k] = sd[k].float() + (b @ a) * (alpha / r)
    # the release: fp16 model, fp16 LoRA weights, fp16 product and sum (emulated on CPU)
    delta16 = ((b.half().float() @ a.half().float()).half() * (alpha / r))
    release = (sd[k].half().float() + delta16.float()).half()
    ours = merged[k].half()
    diff = (release.float() - ours.float()).abs().max().item()
    worst, rel = max(worst, diff), max(rel, diff / ours.float().abs().max().item())
    changed += int((release != ours).sum()); total += ours.numel()
shutil.copytree(base, expected)
for f in set(idx["weight_map"].values()):
    os.remove(os.path.join(expected, f))
os.remove(os.path.join(expected, "model.safetensors.index.json"))
save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(expected, "model.safetensors"))
print(f"release fp16 merge vs fp32 merge rounded to fp16: {changed}/{total} merged elements differ, max |diff| {worst:.3e}, {rel:.2e} of the tensor's largest weight")
"#;

/// Builds the LoRA form over a copy of lm-mha; returns (base, lora, expected).
fn lora_inputs(python: &Path, tmp: &Path, format: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = tmp.join("base");
    common::copy_dir(&common::fixture_dir("lm-mha"), &base);
    let (lora, expected) = (tmp.join(format!("lora-{format}")), tmp.join(format!("expected-{format}")));
    let report = run_python_out(python, MAKE_LORA, &[&base, &lora, &expected, Path::new(format)]);
    println!("{report}");
    (base, lora, expected)
}

fn tensors_of(file: &Path) -> std::collections::BTreeMap<String, Tensor> {
    Tensor::read_safetensors(file).unwrap().into_iter().collect()
}

fn assert_all_bit_identical(reports: &[arcana::parity::TensorReport], what: &str) {
    assert!(reports.iter().any(|r| r.name == "logits"), "{what}: no logits compared");
    for r in reports {
        assert!(r.bit_identical, "{what}: `{}` differs: {r:?}", r.name);
    }
}

#[test]
fn lora_training_output_merges_like_python() {
    let Some(python) = common::python_with_torch() else { return };
    for format in ["safetensors", "bin"] {
        let tmp = tempfile::tempdir().unwrap();
        let (base, lora, expected) = lora_inputs(&python, tmp.path(), format);
        let out = tmp.path().join("out");
        let missing = convert(&["--input", lora.to_str().unwrap(), "--output", out.to_str().unwrap()]);
        assert!(String::from_utf8_lossy(&missing.stderr).contains("--model-base"));
        convert_ok(&lora, &out, &["--dtype", "fp32", "--model-base", base.to_str().unwrap()]);
        // Every tensor equals Python's merge, bit for bit.
        let (ours, theirs) =
            (tensors_of(&out.join("model.safetensors")), tensors_of(&expected.join("model.safetensors")));
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
        for (name, t) in &theirs {
            assert!(ours[name].equal(t), "{format}: `{name}` differs from Python's merge");
        }
        // And the converted folder gives the PyTorch reference's logits and greedy ids on the merged weights.
        let reference = tmp.path().join("reference.safetensors");
        let status = Command::new(&python)
            .arg(common::export_py())
            .args([
                "reference",
                "--checkpoint",
                expected.to_str().unwrap(),
                "--out",
                reference.to_str().unwrap(),
                "--new-tokens",
                "4",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        assert_all_bit_identical(&check(&out, &reference, &Tolerance::BitIdentical).unwrap(), format);
    }
}

fn set_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, v.to_string()).unwrap();
}

fn convert_err_with_base(input: &Path, base: &Path, output: &Path) -> String {
    let out = convert(&[
        "--input",
        input.to_str().unwrap(),
        "--model-base",
        base.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "conversion of a bad input succeeded");
    assert!(!output.exists());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_no_staging_left(output.parent().unwrap());
    stderr
}

#[test]
fn bad_lora_adapters_are_named() {
    let Some(python) = common::python_with_torch() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (base, lora, _) = lora_inputs(&python, tmp.path(), "safetensors");
    let out = tmp.path().join("out");
    let config = lora.join("adapter_config.json");

    set_json(&config, "r", 8.into());
    let err = convert_err_with_base(&lora, &base, &out);
    assert!(
        err.contains("rank mismatch") && err.contains("adapter_model.safetensors") && err.contains("lora_A.weight"),
        "{err}"
    );
    set_json(&config, "r", 4.into());

    let adapter = lora.join("adapter_model.safetensors");
    let original = std::fs::read(&adapter).unwrap();
    let mut tensors = Tensor::read_safetensors(&adapter).unwrap();
    for side in ["A", "B"] {
        let name = format!("base_model.model.model.layers.9.self_attn.q_proj.lora_{side}.weight");
        tensors.push((name, Tensor::zeros([4, 4], (Kind::Float, Device::Cpu))));
    }
    Tensor::write_safetensors(&tensors, &adapter).unwrap();
    let err = convert_err_with_base(&lora, &base, &out);
    assert!(err.contains("`model.layers.9.self_attn.q_proj`") && err.contains("does not have"), "{err}");
    std::fs::write(&adapter, &original).unwrap();

    set_json(&config, "target_modules", serde_json::json!(["k_proj"]));
    let err = convert_err_with_base(&lora, &base, &out);
    assert!(err.contains("not in target_modules"), "{err}");
    set_json(&config, "target_modules", serde_json::json!(["q_proj", "v_proj", "down_proj"]));

    std::fs::remove_file(lora.join("non_lora_trainables.bin")).unwrap();
    let err = convert_err_with_base(&lora, &base, &out);
    assert!(err.contains("non_lora_trainables.bin"), "{err}");
}

/// `--merge-lora` on lm-mha: W' = W + 2 * L_B @ L_A exactly as libtorch computes it in fp32, the flag in
/// config.json, and logits close to the unmerged reference (the same function up to fp32 rounding).
#[test]
fn merge_lora_folds_the_language_branch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    convert_ok(&common::fixture_dir("lm-mha"), &out, &["--dtype", "fp32", "--merge-lora"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["mm_lora_language_merged"], true);

    let source: std::collections::BTreeMap<String, Tensor> =
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
            .iter()
            .flat_map(|f| tensors_of(&common::fixture_dir("lm-mha").join(f)))
            .collect();
    let merged = tensors_of(&out.join("model.safetensors"));
    let mut projections = 0;
    for (name, la) in source.iter().filter(|(n, _)| n.ends_with(".L_Slora_A.weight")) {
        let module = name.trim_end_matches(".L_Slora_A.weight");
        let (w, lb) = (&source[&format!("{module}.weight")], &source[&format!("{module}.L_Slora_B.weight")]);
        let expected = w.to_kind(Kind::Float) + lb.to_kind(Kind::Float).matmul(&la.to_kind(Kind::Float)) * 2.0;
        assert!(merged[&format!("{module}.weight")].equal(&expected), "`{module}.weight`");
        assert!(merged[name].equal(&la.to_kind(Kind::Float)), "the language branch `{name}` is kept");
        projections += 1;
    }
    assert_eq!(projections, 14);

    // Measured with this test (lm-mha, CPU fp32; `cargo test -p arcana-convert --test convert -- --nocapture
    // merge_lora`): see the printed lines and README. The bound, max |diff| <= 1e-5 * max |logit| (about
    // 80 fp32 ulps of the largest logit), is the fp32 rounding of W' carried through two layers, with room.
    // Against the unmerged model run here (same machine and kernels), so only the merge moves bits.
    for file in ["reference.safetensors", "reference.text.safetensors"] {
        let reference = Reference::open(&common::fixture_dir("lm-mha").join(file)).unwrap();
        let unmerged = outputs(&common::fixture_dir("lm-mha"), &reference).unwrap();
        let reports: Vec<_> = outputs(&out, &reference)
            .unwrap()
            .iter()
            .zip(&unmerged)
            .map(|((name, a), (_, b))| compare(name, a, b, &Tolerance::BitIdentical).unwrap())
            .collect();
        for r in &reports {
            println!(
                "merged vs unmerged reference, {file} {:<14} max|diff| {:.3e} rel {:.3e} cos {:.15}",
                r.name, r.max_abs_diff, r.max_rel_diff, r.cosine
            );
        }
        let logits = reports.iter().find(|r| r.name == "logits").unwrap();
        assert!(!logits.bit_identical, "{file}: merging changed nothing; is the merged path used?");
        assert!(logits.max_rel_diff <= 1e-5, "{file}: {logits:?}");
        assert!(reports.iter().find(|r| r.name == "greedy.ids").unwrap().bit_identical, "{file}: greedy ids differ");
    }

    let again = convert(&[
        "--input",
        out.to_str().unwrap(),
        "--output",
        tmp.path().join("twice").to_str().unwrap(),
        "--merge-lora",
    ]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("merge twice"));
}

#[test]
fn merge_lora_without_mm_lora_tensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = convert(&[
        "--input",
        common::fixture_dir("vision-d4-sel-2").to_str().unwrap(),
        "--output",
        tmp.path().join("o").to_str().unwrap(),
        "--merge-lora",
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no MM-LoRA language branch"));
}
