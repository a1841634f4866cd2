//! `tokenizer.json` for a folder with a SentencePiece BPE `tokenizer.model`, equal to what
//! transformers 4.37.2 saves after converting the slow Llama tokenizer (`LlamaConverter`, then
//! `LlamaTokenizerFast`'s post-processor and the special tokens of `tokenizer_config.json`).
use anyhow::{Context, Result};
use arcana::tokenizer::{SentencePiece, TokenizerSettings, WrittenToken};
use serde::{Serialize, Serializer};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The names `LlamaConverter` gives ids 0..3, whatever the model calls those pieces.
const RESERVED: [&str; 3] = ["<unk>", "<s>", "</s>"];
const SPACE: &str = "\u{2581}";

/// A tokenizer configuration this file does not reproduce; the folder then gets no tokenizer.json.
#[derive(Debug)]
pub struct Unsupported(String);
impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Unsupported {}

fn unsupported<T>(path: &Path, what: String) -> Result<T> {
    // The bare name: the folder is the temporary output, which the reader cannot see.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Err(Unsupported(format!("{name}: {what}")).into())
}

#[derive(Serialize, Clone, Copy, PartialEq, Default)]
struct Flags {
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
}

#[derive(Serialize)]
struct AddedToken {
    id: u32,
    content: &'static str,
    #[serde(flatten)]
    flags: Flags,
    special: bool,
}

#[derive(Serialize)]
enum Pattern {
    String(&'static str),
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Normalizer {
    Sequence { normalizers: Vec<Normalizer> },
    Prepend { prepend: &'static str },
    Replace { pattern: Pattern, content: &'static str },
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Decoder {
    Sequence { decoders: Vec<Decoder> },
    Replace { pattern: Pattern, content: &'static str },
    ByteFallback,
    Fuse,
    Strip { content: &'static str, start: u32, stop: u32 },
}

#[derive(Serialize)]
enum TemplatePiece {
    SpecialToken { id: String, type_id: u32 },
    Sequence { id: &'static str, type_id: u32 },
}

#[derive(Serialize)]
struct TemplateToken {
    id: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
}

#[derive(Serialize)]
struct Template {
    #[serde(rename = "type")]
    kind: &'static str,
    single: Vec<TemplatePiece>,
    pair: Vec<TemplatePiece>,
    special_tokens: BTreeMap<String, TemplateToken>,
}

#[derive(Serialize)]
struct Bpe {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: String,
    continuing_subword_prefix: Option<()>,
    end_of_word_suffix: Option<()>,
    fuse_unk: bool,
    byte_fallback: bool,
    #[serde(serialize_with = "as_map")]
    vocab: Vec<(String, u32)>,
    merges: Vec<String>,
}

fn as_map<S: Serializer>(vocab: &[(String, u32)], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(vocab.iter().map(|(k, v)| (k, v)))
}

#[derive(Serialize)]
struct TokenizerJson {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken>,
    normalizer: Normalizer,
    pre_tokenizer: Option<()>,
    post_processor: Template,
    decoder: Decoder,
    model: Bpe,
}

/// What `tokenizer_config.json` and `special_tokens_map.json` decide: BOS/EOS addition and the
/// flags of the reserved tokens (index into `RESERVED`).
struct Options {
    add_bos: bool,
    add_eos: bool,
    bos: Option<usize>,
    eos: Option<usize>,
    flags: [Flags; 3],
}

/// A token's content and flags as a config writes them. Only fully spelled-out flags are taken,
/// since transformers fills missing ones differently by context.
fn spelled_out(path: &Path, key: &str, token: &WrittenToken, needs_type: bool) -> Result<(String, Flags)> {
    let Some(fields) = token.fields else {
        return Ok((token.content.clone(), Flags::default()));
    };
    // transformers refuses a special token written as a dict without `__type` in tokenizer_config.json.
    if needs_type && !fields.typed {
        return unsupported(path, format!("`{key}` is an object without `\"__type\": \"AddedToken\"`"));
    }
    let (Some(single_word), Some(lstrip), Some(rstrip), Some(normalized)) =
        (fields.single_word, fields.lstrip, fields.rstrip, fields.normalized)
    else {
        return unsupported(path, format!("`{key}` lacks one of its four flags"));
    };
    Ok((token.content.clone(), Flags { single_word, lstrip, rstrip, normalized }))
}

fn reserved_index(path: &Path, key: &str, content: &str) -> Result<usize> {
    match RESERVED.iter().position(|r| *r == content) {
        Some(i) => Ok(i),
        None => unsupported(path, format!("`{key}` {content:?} is not one of <unk>, <s>, </s>")),
    }
}

fn read_options(dir: &Path) -> Result<Options> {
    let settings = TokenizerSettings::read(dir)?;
    let config_path = &settings.config_path;
    let (add_bos, add_eos) = (settings.add_bos_token.unwrap_or(true), settings.add_eos_token.unwrap_or(false));
    if dir.join("added_tokens.json").is_file() {
        return unsupported(&dir.join("added_tokens.json"), "added tokens are not reproduced".into());
    }
    if let Some((path, tokens)) = &settings.additional_special_tokens {
        if !tokens.is_empty() {
            return unsupported(path, "additional special tokens are not reproduced".into());
        }
    }
    // `LlamaTokenizer`'s defaults, then the tokens the configs name.
    let mut named: BTreeMap<&str, Option<(String, Flags)>> =
        [("unk_token", Some("<unk>")), ("bos_token", Some("<s>")), ("eos_token", Some("</s>")), ("pad_token", None)]
            .into_iter()
            .map(|(k, v)| (k, v.map(|c| (c.to_string(), Flags::default()))))
            .collect();
    for n in &settings.named {
        let needs_type = n.path == *config_path;
        named.insert(n.key, n.token.as_ref().map(|t| spelled_out(&n.path, n.key, t, needs_type)).transpose()?);
    }
    // `added_tokens_decoder` gives its flags to the tokens the configs name (transformers re-adds
    // unnamed defaults with plain flags over it).
    let mut decoder_flags = HashMap::new();
    for (id, entry) in &settings.added_tokens_decoder {
        let key = format!("added_tokens_decoder.{id}");
        let (content, flags) = spelled_out(config_path, &key, entry, false)?;
        let index = reserved_index(config_path, &key, &content)?;
        if *id != index as u64 || entry.fields().special != Some(true) {
            return unsupported(config_path, format!("`{key}` is not the special token {content:?} at id {index}"));
        }
        decoder_flags.insert(content, flags);
    }
    let mut flags: [Option<Flags>; 3] = [None; 3];
    let mut index_of = HashMap::new();
    for (key, slot) in &named {
        let Some((content, own)) = slot else { continue };
        let i = reserved_index(config_path, key, content)?;
        let f = match decoder_flags.get(content) {
            Some(d) if settings.named(key).is_some() => *d,
            _ => *own,
        };
        // Which of two differing flag sets transformers keeps depends on the order it adds them.
        if flags[i].is_some_and(|prev| prev != f) {
            return unsupported(config_path, format!("{content:?} is named twice with different flags"));
        }
        flags[i] = Some(f);
        index_of.insert(*key, i);
    }
    let bos = index_of.get("bos_token").copied();
    let eos = index_of.get("eos_token").copied();
    if (add_bos && bos.is_none()) || (add_eos && eos.is_none()) {
        return unsupported(config_path, "BOS/EOS is to be added but not named".into());
    }
    Ok(Options { add_bos, add_eos, bos, eos, flags: flags.map(Option::unwrap_or_default) })
}

/// `SentencePieceExtractor.extract(vocab_scores)`: every split of a piece into two pieces is a
/// merge; the splits of one piece are ordered by the ids of their parts, then all merges (stably)
/// by the merged piece's score, highest first. Lengths and splits count characters, as Python does.
fn merges(sp: &SentencePiece, scored: &[(String, f32)]) -> Vec<String> {
    let mut vocab: HashMap<&str, u32> = HashMap::new();
    for id in 0..sp.vocab_size() as u32 {
        vocab.insert(sp.id_to_piece(id).unwrap_or_default(), id);
    }
    // `dict(vocab_scores)`: first position, last score.
    let mut order: Vec<(&str, f32)> = Vec::new();
    let mut position: HashMap<&str, usize> = HashMap::new();
    for (piece, score) in scored {
        match position.get(piece.as_str()) {
            Some(&i) => order[i].1 = *score,
            None => {
                position.insert(piece, order.len());
                order.push((piece, *score));
            }
        }
    }
    let mut all: Vec<(&str, &str, f32)> = Vec::new();
    for (piece, score) in order {
        let mut local: Vec<(&str, &str)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (vocab[l], vocab[r]));
        all.extend(local.into_iter().map(|(l, r)| (l, r, score)));
    }
    all.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    all.into_iter().map(|(l, r, _)| format!("{l} {r}")).collect()
}

fn template_token(i: usize, type_id: u32) -> TemplatePiece {
    TemplatePiece::SpecialToken { id: RESERVED[i].to_string(), type_id }
}

/// `LlamaTokenizerFast.update_post_processor`: `<s> $A </s>` as add_bos/add_eos ask, twice for pairs.
fn post_processor(o: &Options) -> Template {
    let bos = o.bos.filter(|_| o.add_bos);
    let eos = o.eos.filter(|_| o.add_eos);
    let sequence = |id, type_id| {
        let mut v: Vec<TemplatePiece> = bos.map(|i| template_token(i, type_id)).into_iter().collect();
        v.push(TemplatePiece::Sequence { id, type_id });
        v.extend(eos.map(|i| template_token(i, type_id)));
        v
    };
    let single = sequence("A", 0);
    let mut pair = sequence("A", 0);
    pair.extend(sequence("B", 1));
    let special_tokens = bos
        .into_iter()
        .chain(eos)
        .map(|i| {
            let name = RESERVED[i].to_string();
            (name.clone(), TemplateToken { id: name.clone(), ids: vec![i as u32], tokens: vec![name] })
        })
        .collect();
    Template { kind: "TemplateProcessing", single, pair, special_tokens }
}

fn build(sp: &SentencePiece, options: &Options) -> TokenizerJson {
    let scored: Vec<(String, f32)> = (0..sp.vocab_size() as u32)
        .map(|id| match RESERVED.get(id as usize) {
            Some(name) => (name.to_string(), 0.0),
            None => (sp.id_to_piece(id).unwrap_or_default().to_string(), sp.piece_score(id).unwrap_or_default()),
        })
        .collect();
    // `{word: i}` keeps the last id of a repeated word; tokenizers writes the vocab in id order.
    let mut last_id: HashMap<&str, u32> = HashMap::new();
    for (id, (piece, _)) in scored.iter().enumerate() {
        last_id.insert(piece, id as u32);
    }
    let mut vocab: Vec<(String, u32)> = last_id.iter().map(|(p, id)| (p.to_string(), *id)).collect();
    vocab.sort_by_key(|(_, id)| *id);
    let added_tokens = RESERVED
        .iter()
        .zip(options.flags)
        .enumerate()
        .map(|(id, (content, flags))| AddedToken { id: id as u32, content, flags, special: true })
        .collect();
    let replace_space = Pattern::String(" ");
    TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens,
        normalizer: Normalizer::Sequence {
            normalizers: vec![
                Normalizer::Prepend { prepend: SPACE },
                Normalizer::Replace { pattern: replace_space, content: SPACE },
            ],
        },
        pre_tokenizer: None,
        post_processor: post_processor(options),
        decoder: Decoder::Sequence {
            decoders: vec![
                Decoder::Replace { pattern: Pattern::String(SPACE), content: " " },
                Decoder::ByteFallback,
                Decoder::Fuse,
                Decoder::Strip { content: " ", start: 1, stop: 0 },
            ],
        },
        model: Bpe {
            kind: "BPE",
            dropout: None,
            // The trainer's `unk_piece`, which is the text of the unknown piece.
            unk_token: sp.id_to_piece(sp.unk_id()).unwrap_or(RESERVED[0]).to_string(),
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: true,
            byte_fallback: true,
            merges: merges(sp, &scored),
            vocab,
        },
    }
}

/// Writes `<dir>/tokenizer.json` from `<dir>/tokenizer.model` and the configs beside it. A corrupt
/// model or config is an error naming the file; a configuration not reproduced here is
/// [`Unsupported`] and writes nothing.
pub fn write(dir: &Path) -> Result<()> {
    let model_path = dir.join("tokenizer.model");
    let sp = SentencePiece::from_file(&model_path).with_context(|| format!("reading {}", model_path.display()))?;
    if sp.vocab_size() < RESERVED.len() {
        return unsupported(&model_path, "fewer than three pieces".into());
    }
    let options = read_options(dir)?;
    let json = serde_json::to_string_pretty(&build(&sp, &options))?;
    let out = dir.join("tokenizer.json");
    std::fs::write(&out, json).with_context(|| format!("writing {}", out.display()))
}
