//! The Rust tokenizer against the slow transformers 4.37.2 `LlamaTokenizer`.
//!
//! Recorded values in tests/fixtures/tokenizer/ come from
//! `source scripts/env.sh && python parity/tokenizer_fixtures.py` (CI checks them with `--check`).
//! Tests that need the real models skip with a message when ../shared (or $ARCANA_SHARED) is absent.
use std::path::{Path, PathBuf};

use arcana::tokenizer::{SentencePiece, TokenId, Tokenizer, TokenizerKind, TokenizerOptions};
use arcana::Error;
use serde_json::Value;

mod common;

const MODELS: [(&str, &str); 2] =
    [("llama2", "llama2-tokenizer.model"), ("mistral", "mistral-7b-v0.1-tokenizer.model")];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shared_model(file: &str) -> Option<PathBuf> {
    let shared = std::env::var_os("ARCANA_SHARED").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared"));
    let path = shared.join("tokenizers").join(file);
    if path.is_file() {
        Some(path)
    } else {
        println!("skipping: {} is absent (set ARCANA_SHARED)", path.display());
        None
    }
}

fn fixture_lines(name: &str) -> Vec<Value> {
    let path = repo().join("tests/fixtures/tokenizer").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Only '\n' ends a record: JSON escapes it inside strings, unlike U+2028 or U+0085.
    text.split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect()
}

fn ids(v: &Value) -> Vec<TokenId> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as TokenId).collect()
}

fn tokenizer(path: &Path, legacy: bool) -> Tokenizer {
    Tokenizer::from_model_file(path, TokenizerOptions { legacy: Some(legacy), ..Default::default() })
        .expect("load tokenizer")
}

/// Counts matches and keeps the first few mismatches for the failure message.
#[derive(Default)]
struct Tally {
    matched: usize,
    total: usize,
    failures: Vec<String>,
}

impl Tally {
    fn check<T: PartialEq + std::fmt::Debug>(&mut self, what: impl Fn() -> String, got: T, want: T) {
        self.total += 1;
        if got == want {
            self.matched += 1;
        } else if self.failures.len() < 8 {
            self.failures.push(format!("{}\n  got  {got:?}\n  want {want:?}", what()));
        }
    }

    fn assert_all(&self, label: &str) {
        println!("{label}: {}/{} match", self.matched, self.total);
        assert!(self.total > 0, "{label}: nothing compared");
        assert!(
            self.failures.is_empty(),
            "{label}: {} mismatches, first ones:\n{}",
            self.total - self.matched,
            self.failures.join("\n")
        );
    }
}

/// Encode, decode and decode-with-specials of every fuzzed string, both models, both `legacy`.
#[test]
fn matches_slow_llama_tokenizer_on_fuzzed_strings() {
    let strings: Vec<String> =
        fixture_lines("strings.jsonl").iter().map(|v| v.as_str().expect("string").to_string()).collect();
    assert!(strings.len() >= 5000);
    for (name, file) in MODELS {
        let Some(path) = shared_model(file) else {
            return;
        };
        let records = fixture_lines(&format!("{name}.jsonl"));
        assert_eq!(records.len(), strings.len());
        for (key, legacy) in [("L", true), ("N", false)] {
            let tok = tokenizer(&path, legacy);
            let (mut enc, mut dec, mut dec_special) = (Tally::default(), Tally::default(), Tally::default());
            for (text, rec) in strings.iter().zip(&records) {
                let want = ids(rec.get(key).unwrap_or(&rec["L"]));
                let got = tok.encode(text);
                enc.check(|| format!("encode {text:?}"), &got, &want);
                let want_text = rec.get(format!("d{key}")).map_or(text.as_str(), |v| v.as_str().expect("text"));
                dec.check(|| format!("decode {want:?}"), tok.decode(&want).ok().as_deref(), Some(want_text));
                if let Some(v) = rec.get(format!("s{key}")) {
                    let got = tok.decode_with_special_tokens(&want).ok();
                    dec_special.check(|| format!("decode with specials {want:?}"), got.as_deref(), v.as_str());
                }
            }
            enc.assert_all(&format!("{name} legacy={legacy} encode"));
            dec.assert_all(&format!("{name} legacy={legacy} decode"));
            dec_special.assert_all(&format!("{name} legacy={legacy} decode with special tokens"));
        }
    }
}

/// Random id sequences (lone byte pieces, specials anywhere) decode as transformers decodes them.
#[test]
fn decodes_random_id_sequences_like_transformers() {
    for (name, file) in MODELS {
        let Some(path) = shared_model(file) else {
            return;
        };
        let records = fixture_lines(&format!("{name}-decode.jsonl"));
        for (key, legacy) in [("L", true), ("N", false)] {
            let tok = tokenizer(&path, legacy);
            let mut tally = Tally::default();
            for rec in &records {
                let seq = ids(&rec["ids"]);
                let want = rec[format!("d{key}")].as_str();
                tally.check(|| format!("decode {seq:?}"), tok.decode(&seq).ok().as_deref(), want);
                let want = rec[format!("s{key}")].as_str();
                let got = tok.decode_with_special_tokens(&seq).ok();
                tally.check(|| format!("decode with specials {seq:?}"), got.as_deref(), want);
            }
            tally.assert_all(&format!("{name} legacy={legacy} random ids"));
        }
    }
}

/// add_bos_token=False, add_eos_token=True.
#[test]
fn honours_add_bos_and_add_eos() {
    let strings = fixture_lines("strings.jsonl");
    for (name, file) in MODELS {
        let Some(path) = shared_model(file) else {
            return;
        };
        let records = fixture_lines(&format!("{name}-options.jsonl"));
        for (key, legacy) in [("L", true), ("N", false)] {
            let options = TokenizerOptions {
                legacy: Some(legacy),
                add_bos_token: false,
                add_eos_token: true,
                ..Default::default()
            };
            let tok = Tokenizer::from_model_file(&path, options).expect("load");
            let mut tally = Tally::default();
            for (text, rec) in strings.iter().zip(&records) {
                let text = text.as_str().expect("string");
                tally.check(|| format!("encode {text:?}"), tok.encode(text), ids(&rec[key]));
            }
            tally.assert_all(&format!("{name} legacy={legacy} add_eos"));
        }
    }
}

/// The example of ARCANA-REFERENCE.md: what follows `</s>` differs between the two settings.
#[test]
fn legacy_flag_changes_text_after_special_tokens() {
    let Some(path) = shared_model("llama2-tokenizer.model") else {
        return;
    };
    let text = "ok</s>USER: next";
    assert_eq!(tokenizer(&path, true).encode(text), vec![1, 3431, 2, 3148, 1001, 29901, 2446]);
    assert_eq!(tokenizer(&path, false).encode(text), vec![1, 3431, 2, 11889, 29901, 2446]);
}

/// Pushing ids one by one gives the full decode, and no chunk ends inside a character (each
/// chunk is a `String`, so a split character would have shown up as U+FFFD).
#[test]
fn stream_decoder_concatenates_to_full_decode() {
    let strings = fixture_lines("strings.jsonl");
    for (_, file) in MODELS {
        let Some(path) = shared_model(file) else {
            return;
        };
        for legacy in [true, false] {
            let tok = tokenizer(&path, legacy);
            for text in strings.iter().take(2000) {
                let text = text.as_str().expect("string");
                let seq = tok.encode(text);
                let full = tok.decode(&seq).expect("decode");
                let mut stream = tok.stream();
                let mut chunks = Vec::new();
                for &id in &seq {
                    chunks.push(stream.push(id).expect("push"));
                }
                chunks.push(stream.finish());
                assert_eq!(chunks.concat(), full, "{text:?}");
                if !full.contains('\u{FFFD}') {
                    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{text:?} split a character: {chunks:?}");
                }
            }
        }
    }
}

/// A 4-byte character generated as byte pieces comes out whole, on its last byte.
#[test]
fn stream_decoder_holds_partial_characters() {
    let Some(path) = shared_model("llama2-tokenizer.model") else {
        return;
    };
    let tok = tokenizer(&path, false);
    let sp = tok.sentencepiece().expect("the slow tokenizer");
    let byte_ids: Vec<TokenId> = "🙂".bytes().map(|b| sp.piece_to_id(&format!("<0x{b:02X}>"))).collect();
    let mut stream = tok.stream();
    let outputs: Vec<String> = byte_ids.iter().map(|&id| stream.push(id).expect("push")).collect();
    assert_eq!(outputs, vec!["", "", "", "🙂"]);
    assert_eq!(stream.finish(), "");

    // Cut short, the pending bytes become one U+FFFD each, as sentencepiece decodes them.
    let mut stream = tok.stream();
    for &id in &byte_ids[..2] {
        assert_eq!(stream.push(id).expect("push"), "");
    }
    assert_eq!(stream.finish(), "\u{FFFD}\u{FFFD}");
    assert_eq!(tok.decode(&byte_ids[..2]).expect("decode"), "\u{FFFD}\u{FFFD}");
}

#[test]
fn out_of_range_ids_are_errors() {
    let Some(path) = shared_model("llama2-tokenizer.model") else {
        return;
    };
    let tok = tokenizer(&path, true);
    let err = tok.decode(&[1, 32000]).expect_err("id 32000 is outside a 32000-piece vocabulary");
    assert!(err.to_string().contains("32000"), "{err}");
    assert!(tok.stream().push(u32::MAX).is_err());
}

#[test]
fn folder_constructor_reads_tokenizer_config() {
    let Some(model) = shared_model("llama2-tokenizer.model") else {
        return;
    };
    let dir = tempdir("folder");
    std::fs::copy(&model, dir.join("tokenizer.model")).expect("copy model");
    let text = "USER: hi ASSISTANT: ok</s>USER: next";

    // No config at all: LlamaTokenizer defaults, legacy=True.
    let plain = Tokenizer::from_folder(&dir).expect("load");
    assert!(plain.legacy());
    assert_eq!(plain.encode(text), tokenizer(&model, true).encode(text));

    let config = r#"{"add_bos_token": false, "add_eos_token": true, "legacy": false,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false,
                      "rstrip": false, "single_word": false},
        "pad_token": null, "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"}"#;
    std::fs::write(dir.join("tokenizer_config.json"), config).expect("write config");
    let tok = Tokenizer::from_folder(&dir).expect("load");
    assert!(!tok.legacy());
    let expected = tokenizer(&model, false).encode_with(text, false);
    assert_eq!(tok.encode(text), [expected, vec![2]].concat());

    // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
    std::fs::write(dir.join("special_tokens_map.json"), r#"{"pad_token": "<unk>"}"#).expect("write map");
    assert_eq!(Tokenizer::from_folder(&dir).expect("load").pad_id(), Some(0));

    // Strip flags from `added_tokens_decoder` apply to special tokens the config names, not to
    // defaults. Values from `LlamaTokenizer.from_pretrained(dir).encode("a </s>  b")` with
    // transformers 4.37.2 and these two tokenizer_config.json files.
    std::fs::remove_file(dir.join("special_tokens_map.json")).expect("remove map");
    let declared = r#""added_tokens_decoder": {"2": {"content": "</s>", "lstrip": true,
        "normalized": false, "rstrip": true, "single_word": false, "special": true}}"#;
    let named = format!(r#"{{"legacy": false, "eos_token": "</s>", {declared}}}"#);
    std::fs::write(dir.join("tokenizer_config.json"), named).expect("write config");
    let tok = Tokenizer::from_folder(&dir).expect("load");
    assert_eq!(tok.encode("a </s>  b"), vec![1, 263, 2, 29890]);
    let unnamed = format!(r#"{{"legacy": false, {declared}}}"#);
    std::fs::write(dir.join("tokenizer_config.json"), unnamed).expect("write config");
    let tok = Tokenizer::from_folder(&dir).expect("load");
    assert_eq!(tok.encode("a </s>  b"), vec![1, 263, 29871, 2, 29871, 289]);

    std::fs::write(dir.join("tokenizer_config.json"), r#"{"legacy": "yes"}"#).expect("write config");
    let err = Tokenizer::from_folder(&dir).expect_err("legacy must be a boolean");
    assert!(err.to_string().contains("tokenizer_config.json") && err.to_string().contains("legacy"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arcana-tokenizer-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

#[test]
fn missing_model_file_is_an_error_naming_it() {
    let dir = tempdir("missing");
    let err = Tokenizer::from_folder(&dir).expect_err("no tokenizer.model");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.model"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupt_model_file_is_an_error_naming_it() {
    let dir = tempdir("corrupt");
    let path = dir.join("tokenizer.model");
    let cases: [&[u8]; 4] = [
        b"", // no pieces
        b"not a sentencepiece model at all",
        &[0x0a, 0xff, 0xff],       // length runs past the end
        &[0x0a, 0x03, 0x0a, 0x01], // a piece cut short
    ];
    for bytes in cases {
        std::fs::write(&path, bytes).expect("write");
        let err = SentencePiece::from_file(&path).expect_err("corrupt model");
        assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
    // A real model cut in half fails too, rather than loading a partial vocabulary silently.
    if let Some(model) = shared_model("llama2-tokenizer.model") {
        let bytes = std::fs::read(model).expect("read model");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
        assert!(Tokenizer::from_model_file(&path, TokenizerOptions::default()).is_err());
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---- The fast tokenizer (tokenizer.json) against transformers 4.37.2's `LlamaTokenizerFast` ----

fn python_with_transformers() -> Option<PathBuf> {
    common::python_with("transformers, sentencepiece, tokenizers")
}

/// A model from ../shared, else (Mistral) the copy that scripts/setup-python.sh downloads.
fn model_for_fast(file: &str) -> Option<PathBuf> {
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/arcana/tokenizers").join(file))
        .filter(|p| p.is_file());
    cached.or_else(|| shared_model(file))
}

/// Writes `LlamaTokenizerFast.from_pretrained(src, from_slow=True)` to argv[3] without
/// tokenizer.model (so that only tokenizer.json can load), reloads it there as `AutoTokenizer` does,
/// and prints one JSON line per fuzzed string (ids, decode, decode with specials) and per random id
/// sequence of argv[4] (decodes).
const FAST_REFERENCE: &str = r#"
import json, os, shutil, sys, warnings
warnings.filterwarnings("ignore")
import transformers
transformers.logging.set_verbosity_error()
from transformers import AutoTokenizer, LlamaTokenizerFast
model, config, out, strings_path, id_seqs_path = sys.argv[1:6]
src = out + "-src"
os.makedirs(src)
shutil.copy(model, os.path.join(src, "tokenizer.model"))
with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
    f.write(config)
LlamaTokenizerFast.from_pretrained(src, from_slow=True).save_pretrained(out)
if os.path.exists(os.path.join(out, "tokenizer.model")):
    os.remove(os.path.join(out, "tokenizer.model"))
fast = AutoTokenizer.from_pretrained(out)
assert type(fast).__name__ == "LlamaTokenizerFast", type(fast)
lines = []
for line in open(strings_path, encoding="utf-8").read().split("\n"):
    if line:
        ids = fast.encode(json.loads(line))
        lines.append({"ids": ids, "d": fast.decode(ids, skip_special_tokens=True),
                      "s": fast.decode(ids, skip_special_tokens=False)})
for line in open(id_seqs_path, encoding="utf-8").read().split("\n"):
    if line:
        ids = json.loads(line)["ids"]
        lines.append({"ids": ids, "d": fast.decode(ids, skip_special_tokens=True),
                      "s": fast.decode(ids, skip_special_tokens=False), "decode_only": True})
sys.stdout.write("\n".join(json.dumps(l, ensure_ascii=True) for l in lines))
"#;

/// Mistral-7B-v0.1's published tokenizer_config.json (special tokens declared, not normalized), and
/// a Llama-2 style one that adds EOS and cleans up spaces, with normalized special tokens.
fn fast_configs() -> [Value; 2] {
    let token = |c: &str, normalized: bool| {
        serde_json::json!({"content": c, "lstrip": false, "normalized": normalized,
                           "rstrip": false, "single_word": false, "special": true})
    };
    [
        serde_json::json!({"add_bos_token": true, "add_eos_token": false,
            "added_tokens_decoder": {"0": token("<unk>", false), "1": token("<s>", false), "2": token("</s>", false)},
            "additional_special_tokens": [], "bos_token": "<s>", "clean_up_tokenization_spaces": false,
            "eos_token": "</s>", "legacy": true, "pad_token": null, "sp_model_kwargs": {},
            "spaces_between_special_tokens": false, "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>", "use_default_system_prompt": false}),
        serde_json::json!({"add_eos_token": true, "clean_up_tokenization_spaces": true,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
            "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
            "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
            "pad_token": null, "tokenizer_class": "LlamaTokenizer"}),
    ]
}

/// Ids, decode and decode-with-specials of every fuzzed string and every random id sequence, and the
/// stream decoder's chunks, against `LlamaTokenizerFast` loaded from the same tokenizer.json.
fn assert_fast_matches_transformers(python: &Path, name: &str, model: &Path, config: &Value) {
    let work = tempdir(&format!("fast-{name}"));
    let folder = work.join("model");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(FAST_REFERENCE)
        .arg(model)
        .arg(config.to_string())
        .arg(&folder)
        .arg(repo().join("tests/fixtures/tokenizer/strings.jsonl"))
        .arg(repo().join(format!("tests/fixtures/tokenizer/{name}-decode.jsonl")))
        .output()
        .expect("run python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!folder.join("tokenizer.model").exists() && folder.join("tokenizer.json").is_file());
    let tok = Tokenizer::from_folder(&folder).expect("load tokenizer.json");
    assert_eq!(tok.kind(), TokenizerKind::Fast);
    let records: Vec<Value> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .split('\n')
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let strings = fixture_lines("strings.jsonl");
    let (mut enc, mut dec, mut dec_special, mut streamed) =
        (Tally::default(), Tally::default(), Tally::default(), Tally::default());
    let mut texts = strings.iter().map(|s| s.as_str().expect("string"));
    for rec in &records {
        let want = ids(&rec["ids"]);
        if rec.get("decode_only").is_none() {
            let text = texts.next().expect("one record per string");
            enc.check(|| format!("encode {text:?}"), tok.encode(text), want.clone());
        }
        let want_text = rec["d"].as_str().expect("text");
        dec.check(|| format!("decode {want:?}"), tok.decode(&want).ok().as_deref(), Some(want_text));
        let got = tok.decode_with_special_tokens(&want).ok();
        dec_special.check(|| format!("decode with specials {want:?}"), got.as_deref(), rec["s"].as_str());
        let mut stream = tok.stream();
        let mut chunks: Vec<String> = want.iter().map(|&id| stream.push(id).expect("push")).collect();
        chunks.push(stream.finish());
        // A chunk holding U+FFFD that the full text lacks would be a split character.
        let split = !want_text.contains('\u{FFFD}') && chunks.iter().any(|c| c.contains('\u{FFFD}'));
        let got = (chunks.concat(), split);
        streamed.check(|| format!("stream {want:?}: {chunks:?}"), got, (want_text.to_string(), false));
    }
    assert_eq!(texts.next(), None, "a record per string");
    let label =
        format!("{name} fast {}", if config["add_eos_token"] == true { "add_eos+clean_up" } else { "release config" });
    enc.assert_all(&format!("{label} encode"));
    dec.assert_all(&format!("{label} decode"));
    dec_special.assert_all(&format!("{label} decode with special tokens"));
    streamed.assert_all(&format!("{label} stream"));
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn fast_tokenizer_matches_transformers_fast() {
    let Some(python) = python_with_transformers() else {
        return;
    };
    for (name, file) in MODELS {
        let Some(model) = model_for_fast(file) else {
            continue;
        };
        for config in fast_configs() {
            assert_fast_matches_transformers(&python, name, &model, &config);
        }
    }
}

/// arcana/model/builder.py: the fast tokenizer for a "mistral" model loaded without a base only.
#[test]
fn the_release_picks_the_fast_tokenizer_for_mistral_models_without_a_base() {
    use TokenizerKind::{Fast, Slow};
    assert_eq!(TokenizerKind::release_choice("llava-v1.6-Mistral-7b", false), Fast);
    assert_eq!(TokenizerKind::release_choice("llava-v1.6-mistral-7b", true), Slow);
    assert_eq!(TokenizerKind::release_choice("arcana-v1-7b", false), Slow);
    assert_eq!(TokenizerKind::release_choice("arcana-v1-7b-lora", true), Slow);
}

/// Each kind loads from its own file, and falls back to the other kind's file when it is missing.
#[test]
fn folder_kind_follows_the_files_present() {
    let dir = tempdir("kinds");
    let err = Tokenizer::from_folder_as(&dir, TokenizerKind::Fast).expect_err("no tokenizer files");
    let message = err.to_string();
    assert!(message.contains("tokenizer.model") && message.contains("tokenizer.json"), "{message}");
    if let Some(model) = shared_model("llama2-tokenizer.model") {
        std::fs::copy(&model, dir.join("tokenizer.model")).expect("copy model");
        let tok = Tokenizer::from_folder_as(&dir, TokenizerKind::Fast).expect("load");
        assert_eq!(tok.kind(), TokenizerKind::Slow);
        let mistral_named = dir.join("llava-mistral-7b");
        let tok = Tokenizer::for_release(&dir, &mistral_named, false).expect("load");
        assert_eq!(tok.kind(), TokenizerKind::Slow, "no tokenizer.json to load fast");
    }
    std::fs::remove_dir_all(&dir).ok();
}
