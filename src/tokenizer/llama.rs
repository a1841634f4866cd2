//! The slow `transformers.LlamaTokenizer` (4.37.2) on top of [`SentencePiece`]: special tokens
//! written in the text, the `legacy` flag, BOS/EOS, and `decode`.
use std::collections::HashMap;
use std::path::Path;

use super::sentencepiece::{PieceDecoder, SentencePiece, TokenId, SPACE_SYMBOL};
use super::special::SpecialIds;
use crate::{Error, Result};

/// A token that is split out of the text before SentencePiece sees it (transformers' `AddedToken`
/// with `special=True`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    /// Eat the whitespace on the left / right of the token when it is found in text.
    pub lstrip: bool,
    pub rstrip: bool,
}

impl SpecialToken {
    pub fn new(content: impl Into<String>) -> Self {
        SpecialToken { content: content.into(), lstrip: false, rstrip: false }
    }
}

/// The `LlamaTokenizer` constructor arguments that change ids or text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerOptions {
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    /// `None` is what an absent `legacy` means: true.
    pub legacy: Option<bool>,
    pub clean_up_tokenization_spaces: bool,
    pub unk_token: Option<SpecialToken>,
    pub bos_token: Option<SpecialToken>,
    pub eos_token: Option<SpecialToken>,
    pub pad_token: Option<SpecialToken>,
    pub additional_special_tokens: Vec<SpecialToken>,
}

impl Default for TokenizerOptions {
    /// `LlamaTokenizer`'s own defaults.
    fn default() -> Self {
        TokenizerOptions {
            add_bos_token: true,
            add_eos_token: false,
            legacy: None,
            clean_up_tokenization_spaces: false,
            unk_token: Some(SpecialToken::new("<unk>")),
            bos_token: Some(SpecialToken::new("<s>")),
            eos_token: Some(SpecialToken::new("</s>")),
            pad_token: None,
            additional_special_tokens: Vec::new(),
        }
    }
}

/// A tokenizer that gives the ids of `LlamaTokenizer.from_pretrained(..., use_fast=False)`.
#[derive(Debug, Clone)]
pub struct LlamaTokenizer {
    sp: SentencePiece,
    legacy: bool,
    add_bos_token: bool,
    add_eos_token: bool,
    clean_up_tokenization_spaces: bool,
    /// Special tokens by content, longest first (the order text is matched in).
    specials: Vec<(SpecialToken, TokenId)>,
    by_content: HashMap<String, TokenId>,
    unk_token: String,
    /// How many pieces `unk_token` encodes to; non-legacy encoding strips that many.
    unk_token_length: usize,
    special_ids: SpecialIds,
}

/// One token of `tokenize`: its string (a piece or a special token) and its id.
type Token = (String, TokenId);

impl LlamaTokenizer {
    /// Loads `tokenizer.model` from `path` with the given options.
    pub fn from_model_file(path: &Path, options: TokenizerOptions) -> Result<Self> {
        let sp = SentencePiece::from_file(path)?;
        Self::new(sp, options).map_err(|e| match e {
            Error::Tokenizer(msg) => Error::Tokenizer(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Wraps a loaded model. Special tokens must be pieces of the model: added tokens beyond the
    /// SentencePiece vocabulary are not supported.
    pub fn new(sp: SentencePiece, options: TokenizerOptions) -> Result<Self> {
        let legacy = options.legacy.unwrap_or(true);
        // transformers reloads the proto with add_dummy_prefix=false when not legacy.
        let sp = if legacy { sp } else { sp.with_add_dummy_prefix(false) };
        let id_of = |t: &SpecialToken| -> Result<TokenId> {
            let id = sp.piece_to_id(&t.content);
            if sp.id_to_piece(id) != Some(t.content.as_str()) {
                return Err(Error::Tokenizer(format!(
                    "special token {:?} is not a piece of the SentencePiece model (added tokens are not supported)",
                    t.content
                )));
            }
            Ok(id)
        };
        let mut specials: Vec<(SpecialToken, TokenId)> = Vec::new();
        for t in options.named_special_tokens() {
            if !specials.iter().any(|(s, _)| s.content == t.content) {
                specials.push((t.clone(), id_of(t)?));
            }
        }
        let special_ids = SpecialIds::resolve(&options, id_of, specials.iter().map(|(_, id)| *id).collect())?;
        let unk_token = options.unk_token.as_ref().map_or_else(|| "<unk>".to_string(), |t| t.content.clone());
        specials.sort_by_key(|(t, _)| std::cmp::Reverse(t.content.len()));
        let by_content = specials.iter().map(|(t, id)| (t.content.clone(), *id)).collect();
        let unk_token_length = sp.encode(&unk_token).len();
        Ok(LlamaTokenizer {
            sp,
            legacy,
            add_bos_token: options.add_bos_token,
            add_eos_token: options.add_eos_token,
            clean_up_tokenization_spaces: options.clean_up_tokenization_spaces,
            specials,
            by_content,
            unk_token,
            unk_token_length,
            special_ids,
        })
    }

    pub fn sentencepiece(&self) -> &SentencePiece {
        &self.sp
    }
    pub fn legacy(&self) -> bool {
        self.legacy
    }
    pub fn vocab_size(&self) -> usize {
        self.sp.vocab_size()
    }
    pub fn special_ids(&self) -> &SpecialIds {
        &self.special_ids
    }

    /// `tokenizer.encode(text)`: BOS/EOS as configured around the text's ids.
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        self.encode_with(text, true)
    }

    /// `tokenizer.encode(text, add_special_tokens=...)`.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Vec<TokenId> {
        let mut ids = Vec::new();
        if add_special_tokens && self.add_bos_token {
            ids.extend(self.special_ids.bos);
        }
        ids.extend(self.tokenize(text).into_iter().map(|(_, id)| id));
        if add_special_tokens && self.add_eos_token {
            ids.extend(self.special_ids.eos);
        }
        ids
    }

    /// `tokenizer.tokenize(text)` with each token's id.
    pub fn tokenize(&self, text: &str) -> Vec<Token> {
        if self.legacy || text.is_empty() {
            return self.tokenize_split(text);
        }
        // Non-legacy: one dummy prefix for the whole text, none after special tokens.
        let text = format!("{SPACE_SYMBOL}{}", text.replace(SPACE_SYMBOL, " "));
        let mut tokens = self.tokenize_split(&text);
        if tokens.len() > 1 && tokens[0].0 == SPACE_SYMBOL && self.by_content.contains_key(&tokens[1].0) {
            tokens.remove(0);
        }
        tokens
    }

    /// `PreTrainedTokenizer.tokenize`: split on special tokens, strip around them as they ask,
    /// SentencePiece the rest.
    fn tokenize_split(&self, text: &str) -> Vec<Token> {
        let mut parts: Vec<(String, Option<usize>)> = Vec::new();
        let mut rest_start = 0;
        let mut pos = 0;
        while pos < text.len() {
            let found = self.specials.iter().position(|(t, _)| text[pos..].starts_with(t.content.as_str()));
            match found {
                Some(k) => {
                    parts.push((text[rest_start..pos].to_string(), None));
                    parts.push((self.specials[k].0.content.clone(), Some(k)));
                    pos += self.specials[k].0.content.len();
                    rest_start = pos;
                }
                None => pos += text[pos..].chars().next().map_or(1, char::len_utf8),
            }
        }
        parts.push((text[rest_start..].to_string(), None));
        parts.retain(|(s, k)| k.is_some() || !s.is_empty());

        for i in 0..parts.len() {
            let Some(k) = parts[i].1 else { continue };
            let special = &self.specials[k].0;
            if special.rstrip && i + 1 < parts.len() && parts[i + 1].1.is_none() {
                parts[i + 1].0 = py_lstrip(&parts[i + 1].0).to_string();
            }
            if special.lstrip && i > 0 && parts[i - 1].1.is_none() {
                parts[i - 1].0 = py_rstrip(&parts[i - 1].0).to_string();
            }
        }

        let mut tokens = Vec::new();
        for (s, k) in parts {
            match k {
                Some(k) => tokens.push((s, self.specials[k].1)),
                None if s.is_empty() => {}
                None => tokens.extend(self.tokenize_piece_text(&s)),
            }
        }
        tokens
    }

    /// `LlamaTokenizer._tokenize`: non-legacy text that starts with a space is encoded after the
    /// unknown token's text, whose pieces are then dropped, so that no dummy prefix is invented.
    fn tokenize_piece_text(&self, text: &str) -> Vec<Token> {
        if self.legacy || !(text.starts_with(SPACE_SYMBOL) || text.starts_with(' ')) {
            return self.pieces_to_tokens(self.sp.encode(text));
        }
        let pieces = self.sp.encode(&format!("{}{text}", self.unk_token));
        let skip = if pieces.len() >= self.unk_token_length { self.unk_token_length } else { 0 };
        self.pieces_to_tokens(pieces.into_iter().skip(skip).collect())
    }

    /// `convert_tokens_to_ids`: special-token contents win over SentencePiece ids.
    fn pieces_to_tokens(&self, pieces: Vec<(String, TokenId)>) -> Vec<Token> {
        pieces
            .into_iter()
            .map(|(p, id)| {
                let id = self.by_content.get(&p).copied().unwrap_or(id);
                (p, id)
            })
            .collect()
    }

    /// The piece string of `id`, or an error naming the id when it is outside the vocabulary.
    pub(crate) fn piece_of(&self, id: TokenId) -> Result<&str> {
        self.sp.id_to_piece(id).ok_or_else(|| {
            Error::Tokenizer(format!("token id {id} is outside the vocabulary (size {})", self.sp.vocab_size()))
        })
    }

    /// `tokenizer.decode(ids, skip_special_tokens=True)`.
    pub fn decode(&self, ids: &[TokenId]) -> Result<String> {
        let mut stream = SlowStream::new(self);
        let mut text = String::new();
        for &id in ids {
            text.push_str(&stream.push(id)?);
        }
        // The stream applies `clean_up_tokenization_spaces` itself.
        text.push_str(&stream.finish());
        Ok(text)
    }

    /// `tokenizer.decode(ids, skip_special_tokens=False)`: special tokens appear as their text,
    /// and each stretch between them is decoded by SentencePiece on its own.
    pub fn decode_with_special_tokens(&self, ids: &[TokenId]) -> Result<String> {
        let mut tokens: Vec<&str> = ids.iter().map(|&id| self.piece_of(id)).collect::<Result<_>>()?;
        let Some(first) = tokens.first_mut() else {
            return Ok(String::new());
        };
        // transformers removes the first token's U+2581 itself, as it adds the prefix itself.
        if let Some(rest) = first.strip_prefix(SPACE_SYMBOL) {
            *first = rest;
        }
        let mut out = String::new();
        let mut stretch: Vec<&str> = Vec::new();
        let mut prev_is_special = false;
        for (i, token) in tokens.iter().enumerate() {
            if self.by_content.contains_key(*token) {
                if !prev_is_special && i != 0 && self.legacy {
                    out.push(' ');
                }
                out.push_str(&self.sp.decode_pieces(&stretch));
                out.push_str(token);
                stretch.clear();
                prev_is_special = true;
            } else {
                stretch.push(token);
                prev_is_special = false;
            }
        }
        out.push_str(&self.sp.decode_pieces(&stretch));
        Ok(self.clean_up(out))
    }

    pub(crate) fn clean_up_enabled(&self) -> bool {
        self.clean_up_tokenization_spaces
    }

    /// `clean_up_tokenization`, when the config asks for it.
    pub(crate) fn clean_up(&self, text: String) -> String {
        if !self.clean_up_tokenization_spaces {
            return text;
        }
        clean_up_tokenization(text)
    }

    /// A decoder for ids that arrive one at a time (generation).
    pub(crate) fn stream(&self) -> SlowStream<'_> {
        SlowStream::new(self)
    }

    pub(crate) fn new_piece_decoder(&self) -> PieceDecoder<'_> {
        PieceDecoder::new(&self.sp)
    }
}

/// `PreTrainedTokenizerBase.clean_up_tokenization` (4.37.2).
pub(super) fn clean_up_tokenization(text: String) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    RULES.iter().fold(text, |t, (from, to)| t.replace(from, to))
}

/// Python's `str.isspace` set, which also holds U+001C..U+001F unlike `char::is_whitespace`.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_lstrip(s: &str) -> &str {
    s.trim_start_matches(py_isspace)
}

fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(py_isspace)
}

/// The slow tokenizer's stream: SentencePiece pieces decoded as they come.
#[derive(Debug, Clone)]
pub(crate) struct SlowStream<'t> {
    tokenizer: &'t LlamaTokenizer,
    pieces: PieceDecoder<'t>,
    seen_first: bool,
    held: String,
}

impl<'t> SlowStream<'t> {
    pub(crate) fn new(tokenizer: &'t LlamaTokenizer) -> Self {
        SlowStream { tokenizer, pieces: tokenizer.new_piece_decoder(), seen_first: false, held: String::new() }
    }

    /// Adds one id; returns the text that is now final (often empty). Special tokens add nothing.
    /// An id outside the vocabulary is an error and leaves the decoder as it was.
    pub fn push(&mut self, id: TokenId) -> Result<String> {
        let piece = self.tokenizer.piece_of(id)?;
        if self.tokenizer.special_ids.is_special(id) {
            return Ok(String::new());
        }
        let mut out = String::new();
        if self.seen_first {
            self.pieces.push_piece(piece, &mut out);
        } else {
            // transformers strips U+2581 from the first kept token before SentencePiece decodes.
            self.seen_first = true;
            self.pieces.push_piece(piece.strip_prefix(SPACE_SYMBOL).unwrap_or(piece), &mut out);
        }
        Ok(self.release(out))
    }

    /// Ends the sequence: bytes that never completed a character come out as U+FFFD.
    pub fn finish(mut self) -> String {
        let mut out = String::new();
        self.pieces.finish(&mut out);
        if self.tokenizer.clean_up_enabled() {
            self.held.push_str(&out);
            return self.tokenizer.clean_up(std::mem::take(&mut self.held));
        }
        out
    }

    fn release(&mut self, out: String) -> String {
        if self.tokenizer.clean_up_enabled() {
            self.held.push_str(&out);
            return String::new();
        }
        out
    }
}
