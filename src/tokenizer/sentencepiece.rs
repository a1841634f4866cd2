//! A SentencePiece BPE processor with the semantics of sentencepiece 0.1.99: identity normalizer,
//! score-ordered merges, byte fallback, and `Decode` over piece strings.
use std::collections::HashMap;
use std::path::Path;

use super::bpe;
use super::proto::{parse_model_proto, ModelType, PieceType};
use super::utf8_bytes::{next_char, ByteChar};
use crate::{Error, Result};

pub use super::proto::TokenId;

/// What to do with U+0020, as `NormalizerSpec` says.
pub(crate) const SPACE_SYMBOL: &str = "\u{2581}";

#[derive(Debug, Clone)]
pub(crate) struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceType,
}

/// A loaded `tokenizer.model`.
#[derive(Debug, Clone)]
pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// NORMAL, USER_DEFINED and UNUSED pieces: the ones merges may produce.
    mergeable: HashMap<String, TokenId>,
    /// CONTROL, UNKNOWN and BYTE pieces: looked up first by `piece_to_id`.
    reserved: HashMap<String, TokenId>,
    /// USER_DEFINED pieces, which the input splitter keeps whole.
    user_defined: Vec<String>,
    byte_ids: Vec<TokenId>,
    unk_id: TokenId,
    bos_id: Option<TokenId>,
    eos_id: Option<TokenId>,
    pad_id: Option<TokenId>,
    unk_surface: String,
    byte_fallback: bool,
    split_digits: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

fn optional_id(id: i32, len: usize) -> Option<TokenId> {
    (id >= 0 && (id as usize) < len).then_some(id as TokenId)
}

/// `<0xNN>` to its byte, as `PieceToByte` reads it.
fn byte_of_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl SentencePiece {
    /// Reads a serialized `ModelProto` from `path`. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::Tokenizer(msg) => Error::Tokenizer(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses a serialized `ModelProto`. Only BPE models with an identity normalizer are accepted,
    /// since those are the only ones whose behaviour is implemented here.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |msg: String| Error::Tokenizer(format!("not a valid SentencePiece model: {msg}"));
        let proto = parse_model_proto(bytes).map_err(bad)?;
        let unsupported = |msg: &str| Err(Error::Tokenizer(format!("unsupported SentencePiece model: {msg}")));
        if proto.pieces.is_empty() {
            return Err(bad("it has no pieces".into()));
        }
        if proto.model_type != ModelType::Bpe {
            return unsupported(&format!("model_type {:?} (only BPE is implemented)", proto.model_type));
        }
        if proto.precompiled_charsmap_len > 0 || proto.has_denormalizer {
            return unsupported(&format!("normalizer `{}` with a character map", proto.normalizer_name));
        }
        if proto.treat_whitespace_as_suffix {
            return unsupported("treat_whitespace_as_suffix");
        }

        let mut mergeable = HashMap::new();
        let mut reserved = HashMap::new();
        let mut user_defined = Vec::new();
        let mut byte_ids = vec![TokenId::MAX; 256];
        let mut unk_id = None;
        for (i, p) in proto.pieces.iter().enumerate() {
            let id = i as TokenId;
            if p.piece.is_empty() {
                return Err(bad(format!("piece {id} is empty")));
            }
            let map = match p.kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => &mut mergeable,
                _ => &mut reserved,
            };
            if map.insert(p.piece.clone(), id).is_some() {
                return Err(bad(format!("piece {:?} is defined twice", p.piece)));
            }
            match p.kind {
                PieceType::UserDefined => user_defined.push(p.piece.clone()),
                PieceType::Unknown if unk_id.is_some() => return Err(bad("two unknown pieces".into())),
                PieceType::Unknown => unk_id = Some(id),
                PieceType::Byte => {
                    let byte =
                        byte_of_piece(&p.piece).ok_or_else(|| bad(format!("byte piece {:?} is invalid", p.piece)))?;
                    byte_ids[byte as usize] = id;
                }
                _ => {}
            }
        }
        let unk_id = unk_id.ok_or_else(|| bad("no unknown piece".into()))?;
        if proto.byte_fallback && byte_ids.contains(&TokenId::MAX) {
            return Err(bad("byte_fallback is set but not all 256 byte pieces exist".into()));
        }
        // Longest first, so that the first match is the longest one.
        user_defined.sort_by_key(|u| std::cmp::Reverse(u.len()));

        let len = proto.pieces.len();
        Ok(SentencePiece {
            pieces: proto.pieces.into_iter().map(|p| Piece { text: p.piece, score: p.score, kind: p.kind }).collect(),
            mergeable,
            reserved,
            user_defined,
            byte_ids,
            unk_id,
            bos_id: optional_id(proto.bos_id, len),
            eos_id: optional_id(proto.eos_id, len),
            pad_id: optional_id(proto.pad_id, len),
            unk_surface: proto.unk_surface,
            byte_fallback: proto.byte_fallback,
            split_digits: proto.split_digits,
            add_dummy_prefix: proto.add_dummy_prefix,
            remove_extra_whitespaces: proto.remove_extra_whitespaces,
            escape_whitespaces: proto.escape_whitespaces,
        })
    }

    /// The same model with `normalizer_spec.add_dummy_prefix` overridden (transformers does this for
    /// `legacy=False`; it changes both encoding and decoding).
    pub fn with_add_dummy_prefix(mut self, add_dummy_prefix: bool) -> Self {
        self.add_dummy_prefix = add_dummy_prefix;
        self
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }
    pub fn unk_id(&self) -> TokenId {
        self.unk_id
    }
    pub fn bos_id(&self) -> Option<TokenId> {
        self.bos_id
    }
    pub fn eos_id(&self) -> Option<TokenId> {
        self.eos_id
    }
    pub fn pad_id(&self) -> Option<TokenId> {
        self.pad_id
    }
    pub fn byte_fallback(&self) -> bool {
        self.byte_fallback
    }
    /// A training option; encoding needs nothing for it since no piece holds two digits.
    pub fn split_digits(&self) -> bool {
        self.split_digits
    }
    pub fn add_dummy_prefix(&self) -> bool {
        self.add_dummy_prefix
    }

    /// The piece of `id`, if `id` is in the vocabulary.
    pub fn id_to_piece(&self, id: TokenId) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    /// The score of `id`, if `id` is in the vocabulary (BPE merge priority: higher merges first).
    pub fn piece_score(&self, id: TokenId) -> Option<f32> {
        self.pieces.get(id as usize).map(|p| p.score)
    }

    /// `PieceToId`: reserved pieces first, then the others, else the unknown id.
    pub fn piece_to_id(&self, piece: &str) -> TokenId {
        self.reserved.get(piece).or_else(|| self.mergeable.get(piece)).copied().unwrap_or(self.unk_id)
    }

    pub(crate) fn kind(&self, id: TokenId) -> Option<PieceType> {
        self.pieces.get(id as usize).map(|p| p.kind)
    }

    pub(crate) fn mergeable_id(&self, piece: &str) -> Option<TokenId> {
        self.mergeable.get(piece).copied()
    }

    pub(crate) fn score(&self, id: TokenId) -> f32 {
        self.pieces[id as usize].score
    }

    pub(crate) fn unk_surface(&self) -> &str {
        &self.unk_surface
    }

    pub(crate) fn byte_value(&self, id: TokenId) -> Option<u8> {
        match self.kind(id)? {
            PieceType::Byte => byte_of_piece(&self.pieces[id as usize].text),
            _ => None,
        }
    }

    /// Length of the user-defined piece that starts `text`, if any.
    pub(crate) fn user_defined_prefix(&self, text: &str) -> Option<usize> {
        self.user_defined.iter().find(|u| text.starts_with(u.as_str())).map(|u| u.len())
    }

    /// `Normalizer::Normalize` for an identity normalizer: optional dummy prefix, optional removal
    /// of extra spaces, and spaces escaped as U+2581.
    pub(crate) fn normalize(&self, input: &str) -> String {
        let mut input = input;
        if self.remove_extra_whitespaces {
            input = input.trim_start_matches(' ');
        }
        if input.is_empty() {
            return String::new();
        }
        let space = if self.escape_whitespaces { SPACE_SYMBOL } else { " " };
        let mut out = String::with_capacity(input.len() * 3);
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        let mut rest = input;
        while !rest.is_empty() {
            // User-defined pieces pass through whole, as `NormalizePrefix` does.
            let len = self.user_defined_prefix(rest).unwrap_or_else(|| next_char_len(rest));
            let (chunk, tail) = rest.split_at(len);
            rest = tail;
            let chunk = if prev_space { chunk.trim_start_matches(' ') } else { chunk };
            if !chunk.is_empty() {
                out.push_str(&chunk.replace(' ', space));
                prev_space = chunk.ends_with(' ');
            }
            if !self.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    /// `SentencePieceProcessor::Encode` to pieces: normalize, merge, then expand unknown pieces to
    /// bytes (byte fallback) or join runs of them (no byte fallback).
    pub fn encode(&self, text: &str) -> Vec<(String, TokenId)> {
        let normalized = self.normalize(text);
        let mut out: Vec<(String, TokenId)> = Vec::new();
        let mut prev_unk = false;
        for (piece, id) in bpe::merge(self, &normalized) {
            let is_unk = self.kind(id) == Some(PieceType::Unknown);
            if is_unk && self.byte_fallback {
                for &b in piece.as_bytes() {
                    let byte_id = self.byte_ids[b as usize];
                    out.push((format!("<0x{b:02X}>"), byte_id));
                }
            } else if is_unk && prev_unk {
                if let Some(last) = out.last_mut() {
                    last.0.push_str(piece);
                }
            } else {
                out.push((piece.to_string(), id));
            }
            prev_unk = is_unk;
        }
        out
    }

    /// `SentencePieceProcessor::Decode` over piece strings.
    pub fn decode_pieces<S: AsRef<str>>(&self, pieces: &[S]) -> String {
        let mut decoder = PieceDecoder::new(self);
        let mut out = String::new();
        for p in pieces {
            decoder.push_piece(p.as_ref(), &mut out);
        }
        decoder.finish(&mut out);
        out
    }
}

fn next_char_len(s: &str) -> usize {
    s.chars().next().map_or(0, char::len_utf8)
}

/// The state of `SentencePieceProcessor::Decode` between pieces, so that text can be produced one
/// piece at a time: the pending run of byte pieces and whether a leading U+2581 may still be eaten.
#[derive(Debug, Clone)]
pub(crate) struct PieceDecoder<'a> {
    sp: &'a SentencePiece,
    pending_bytes: Vec<u8>,
    is_bos_ws: bool,
    bos_ws_seen: bool,
    text_empty: bool,
}

impl<'a> PieceDecoder<'a> {
    pub(crate) fn new(sp: &'a SentencePiece) -> Self {
        PieceDecoder { sp, pending_bytes: Vec::new(), is_bos_ws: true, bos_ws_seen: false, text_empty: true }
    }

    fn emit(&mut self, text: &str, out: &mut String) {
        if !text.is_empty() {
            self.text_empty = false;
            out.push_str(text);
        }
    }

    /// Emits the characters of the pending bytes that no later byte can change; with `end_of_run`
    /// everything, invalid bytes becoming U+FFFD one byte at a time as sentencepiece does.
    fn drain_bytes(&mut self, end_of_run: bool, out: &mut String) {
        let mut start = 0;
        let mut text = String::new();
        while start < self.pending_bytes.len() {
            match next_char(&self.pending_bytes[start..], end_of_run) {
                Some(ByteChar::Valid(c, len)) => {
                    text.push(c);
                    start += len;
                }
                Some(ByteChar::Invalid) => {
                    text.push('\u{FFFD}');
                    start += 1;
                }
                None => break,
            }
        }
        self.pending_bytes.drain(..start);
        self.emit(&text, out);
    }

    /// Decodes one piece given as a string (its id is `PieceToId` of it, as in sentencepiece).
    pub(crate) fn push_piece(&mut self, piece: &str, out: &mut String) {
        let id = self.sp.piece_to_id(piece);
        if let Some(b) = self.sp.byte_value(id) {
            self.pending_bytes.push(b);
            self.drain_bytes(false, out);
            return;
        }
        self.drain_bytes(true, out);
        if self.bos_ws_seen || !self.text_empty {
            self.is_bos_ws = false;
        }
        let (text, ate_space) = self.surface(piece, id);
        self.bos_ws_seen = ate_space;
        self.emit(&text, out);
    }

    /// `DecodeSentencePiece`: the text of a non-byte piece and whether it ate the leading space.
    fn surface(&self, piece: &str, id: TokenId) -> (String, bool) {
        match self.sp.kind(id) {
            Some(PieceType::Control) => return (String::new(), false),
            Some(PieceType::Unknown) => {
                let text = if self.sp.id_to_piece(id) == Some(piece) { self.sp.unk_surface() } else { piece };
                return (text.to_string(), false);
            }
            _ => {}
        }
        let mut piece = piece;
        let mut ate_space = false;
        if self.is_bos_ws && (self.sp.add_dummy_prefix || self.sp.remove_extra_whitespaces) {
            if let Some(rest) = piece.strip_prefix(SPACE_SYMBOL) {
                piece = rest;
                ate_space = !self.sp.remove_extra_whitespaces;
            }
        }
        (piece.replace(SPACE_SYMBOL, " "), ate_space)
    }

    /// Ends the text: pending bytes that never completed a character become U+FFFD.
    pub(crate) fn finish(&mut self, out: &mut String) {
        self.drain_bytes(true, out);
    }
}

impl bpe::Vocabulary for SentencePiece {
    fn piece_to_id(&self, piece: &str) -> TokenId {
        SentencePiece::piece_to_id(self, piece)
    }

    fn kind(&self, id: TokenId) -> Option<PieceType> {
        SentencePiece::kind(self, id)
    }

    fn mergeable_id(&self, piece: &str) -> Option<TokenId> {
        SentencePiece::mergeable_id(self, piece)
    }

    fn score(&self, id: TokenId) -> f32 {
        SentencePiece::score(self, id)
    }

    fn user_defined_prefix(&self, text: &str) -> Option<usize> {
        SentencePiece::user_defined_prefix(self, text)
    }
}
