//! The Rust tokenizer against the slow transformers 4.37.2 `LlamaTokenizer`.
//!
//! Recorded values in tests/fixtures/tokenizer/ come from
//! `source scripts/env.sh && python parity/tokenizer_fixtures.py` (CI checks them with `--check`).
//! Tests that need the real models skip with a message when ../shared (or $ARCANA_SHARED) is absent.
use std::path::{Path, PathBuf};

use arcana::tokenizer::{SentencePiece, TokenId, Tokenizer, TokenizerOptions};
use arcana::Error;
use serde_json::Value;

const MODELS: [(&str, &str); 2] = [
    ("llama2", "llama2-tokenizer.model"),
    ("mistral", "mistral-7b-v0.1-tokenizer.model"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shared_model(file: &str) -> Option<PathBuf> {
    let shared = std::env::var_os("ARCANA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"));
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
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as TokenId)
        .collect()
}

fn tokenizer(path: &Path, legacy: bool) -> Tokenizer {
    Tokenizer::from_model_file(
        path,
        TokenizerOptions {
            legacy: Some(legacy),
            ..Default::default()
        },
    )
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
    fn check<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: impl Fn() -> String,
        got: T,
        want: T,
    ) {
        self.total += 1;
        if got == want {
            self.matched += 1;
        } else if self.failures.len() < 8 {
            self.failures
                .push(format!("{}\n  got  {got:?}\n  want {want:?}", what()));
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
    let strings: Vec<String> = fixture_lines("strings.jsonl")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect();
    assert!(strings.len() >= 5000);
    for (name, file) in MODELS {
        let Some(path) = shared_model(file) else {
            return;
        };
        let records = fixture_lines(&format!("{name}.jsonl"));
        assert_eq!(records.len(), strings.len());
        for (key, legacy) in [("L", true), ("N", false)] {
            let tok = tokenizer(&path, legacy);
            let (mut enc, mut dec, mut dec_special) =
                (Tally::default(), Tally::default(), Tally::default());
            for (text, rec) in strings.iter().zip(&records) {
                let want = ids(rec.get(key).unwrap_or(&rec["L"]));
                let got = tok.encode(text);
                enc.check(|| format!("encode {text:?}"), &got, &want);
                let want_text = rec
                    .get(format!("d{key}"))
                    .map_or(text.as_str(), |v| v.as_str().expect("text"));
                dec.check(
                    || format!("decode {want:?}"),
                    tok.decode(&want).ok().as_deref(),
                    Some(want_text),
                );
                if let Some(v) = rec.get(format!("s{key}")) {
                    let got = tok.decode_with_special_tokens(&want).ok();
                    dec_special.check(
                        || format!("decode with specials {want:?}"),
                        got.as_deref(),
                        v.as_str(),
                    );
                }
            }
            enc.assert_all(&format!("{name} legacy={legacy} encode"));
            dec.assert_all(&format!("{name} legacy={legacy} decode"));
            dec_special.assert_all(&format!(
                "{name} legacy={legacy} decode with special tokens"
            ));
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
                tally.check(
                    || format!("decode {seq:?}"),
                    tok.decode(&seq).ok().as_deref(),
                    want,
                );
                let want = rec[format!("s{key}")].as_str();
                let got = tok.decode_with_special_tokens(&seq).ok();
                tally.check(
                    || format!("decode with specials {seq:?}"),
                    got.as_deref(),
                    want,
                );
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
                tally.check(
                    || format!("encode {text:?}"),
                    tok.encode(text),
                    ids(&rec[key]),
                );
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
    assert_eq!(
        tokenizer(&path, true).encode(text),
        vec![1, 3431, 2, 3148, 1001, 29901, 2446]
    );
    assert_eq!(
        tokenizer(&path, false).encode(text),
        vec![1, 3431, 2, 11889, 29901, 2446]
    );
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
                    assert!(
                        chunks.iter().all(|c| !c.contains('\u{FFFD}')),
                        "{text:?} split a character: {chunks:?}"
                    );
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
    let byte_ids: Vec<TokenId> = "🙂"
        .bytes()
        .map(|b| sp.piece_to_id(&format!("<0x{b:02X}>")))
        .collect();
    let mut stream = tok.stream();
    let outputs: Vec<String> = byte_ids
        .iter()
        .map(|&id| stream.push(id).expect("push"))
        .collect();
    assert_eq!(outputs, vec!["", "", "", "🙂"]);
    assert_eq!(stream.finish(), "");

    // Cut short, the pending bytes become one U+FFFD each, as sentencepiece decodes them.
    let mut stream = tok.stream();
    for &id in &byte_ids[..2] {
        assert_eq!(stream.push(id).expect("push"), "");
    }
    assert_eq!(stream.finish(), "\u{FFFD}\u{FFFD}");
    assert_eq!(
        tok.decode(&byte_ids[..2]).expect("decode"),
        "\u{FFFD}\u{FFFD}"
    );
}

#[test]
fn out_of_range_ids_are_errors() {
    let Some(path) = shared_model("llama2-tokenizer.model") else {
        return;
    };
    let tok = tokenizer(&path, true);
    let err = tok
        .decode(&[1, 32000])
        .expect_err("id 32000 is outside a 32000-piece vocabulary");
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
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"pad_token": "<unk>"}"#,
    )
    .expect("write map");
    assert_eq!(
        Tokenizer::from_folder(&dir).expect("load").pad_id(),
        Some(0)
    );

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

    std::fs::write(dir.join("tokenizer_config.json"), r#"{"legacy": "yes"}"#)
        .expect("write config");
    let err = Tokenizer::from_folder(&dir).expect_err("legacy must be a boolean");
    assert!(
        err.to_string().contains("tokenizer_config.json") && err.to_string().contains("legacy"),
        "{err}"
    );
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
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    // A real model cut in half fails too, rather than loading a partial vocabulary silently.
    if let Some(model) = shared_model("llama2-tokenizer.model") {
        let bytes = std::fs::read(model).expect("read model");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
        assert!(Tokenizer::from_model_file(&path, TokenizerOptions::default()).is_err());
    }
    std::fs::remove_dir_all(&dir).ok();
}
