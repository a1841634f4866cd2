//! Tokenizers equal to those of transformers 4.37.2: the slow `LlamaTokenizer` and the fast
//! `LlamaTokenizerFast`, behind one [`Tokenizer`].
//!
//! [`SentencePiece`] reads `tokenizer.model` (a hand-read protobuf) and encodes/decodes as
//! sentencepiece 0.1.99 does; [`LlamaTokenizer`] adds what the slow class does around it (special
//! tokens in text, `legacy`, BOS/EOS, `decode(skip_special_tokens=True)`). [`FastTokenizer`] runs
//! `tokenizer.json` through the `tokenizers` crate. [`StreamDecoder`] decodes generated ids one at
//! a time with either.
mod bpe;
mod fast;
mod folder;
mod llama;
mod proto;
mod sentencepiece;
mod settings;
mod special;
mod stream;
mod utf8_bytes;

use proto::PieceType;
use std::path::Path;

pub use fast::{ConfigAddedToken, FastTokenizer};
pub use folder::TokenizerKind;
pub use llama::{LlamaTokenizer, SpecialToken, TokenizerOptions};
pub use sentencepiece::{SentencePiece, TokenId};
pub use settings::{AddedTokenFields, NamedToken, TokenizerSettings, WrittenToken};
pub use special::SpecialIds;
pub use stream::StreamDecoder;

use crate::Result;

/// What one token stands for; see [`Tokenizer::token_surface`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSurface {
    Bytes(Vec<u8>),
    Special(String),
}

/// The slow or the fast tokenizer, used alike: encode, decode, stream-decode.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: Implementation,
}

#[derive(Debug, Clone)]
enum Implementation {
    // Boxed: both are hundreds of bytes, of very different sizes.
    Slow(Box<LlamaTokenizer>),
    Fast(Box<FastTokenizer>),
}

impl From<LlamaTokenizer> for Tokenizer {
    fn from(slow: LlamaTokenizer) -> Self {
        Tokenizer { inner: Implementation::Slow(Box::new(slow)) }
    }
}

impl From<FastTokenizer> for Tokenizer {
    fn from(fast: FastTokenizer) -> Self {
        Tokenizer { inner: Implementation::Fast(Box::new(fast)) }
    }
}

impl Tokenizer {
    /// The slow tokenizer from `tokenizer.model` with the given options.
    pub fn from_model_file(path: &Path, options: TokenizerOptions) -> Result<Self> {
        LlamaTokenizer::from_model_file(path, options).map(Tokenizer::from)
    }

    /// The slow tokenizer over a loaded SentencePiece model.
    pub fn new(sp: SentencePiece, options: TokenizerOptions) -> Result<Self> {
        LlamaTokenizer::new(sp, options).map(Tokenizer::from)
    }

    pub fn kind(&self) -> TokenizerKind {
        match &self.inner {
            Implementation::Slow(_) => TokenizerKind::Slow,
            Implementation::Fast(_) => TokenizerKind::Fast,
        }
    }

    /// The SentencePiece model of the slow tokenizer; `None` for the fast one.
    pub fn sentencepiece(&self) -> Option<&SentencePiece> {
        match &self.inner {
            Implementation::Slow(slow) => Some(slow.sentencepiece()),
            Implementation::Fast(_) => None,
        }
    }

    /// The configured `legacy` flag (absent is true). The fast tokenizer's behaviour comes from
    /// its tokenizer.json, which was written with that flag.
    pub fn legacy(&self) -> bool {
        match &self.inner {
            Implementation::Slow(slow) => slow.legacy(),
            Implementation::Fast(fast) => fast.legacy(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Implementation::Slow(slow) => slow.vocab_size(),
            Implementation::Fast(fast) => fast.vocab_size(),
        }
    }

    pub fn special_ids(&self) -> &SpecialIds {
        match &self.inner {
            Implementation::Slow(slow) => slow.special_ids(),
            Implementation::Fast(fast) => fast.special_ids(),
        }
    }

    pub fn bos_id(&self) -> Option<TokenId> {
        self.special_ids().bos
    }

    pub fn eos_id(&self) -> Option<TokenId> {
        self.special_ids().eos
    }

    pub fn pad_id(&self) -> Option<TokenId> {
        self.special_ids().pad
    }

    pub fn is_special(&self, id: TokenId) -> bool {
        self.special_ids().is_special(id)
    }

    /// `tokenizer.encode(text)`: BOS/EOS as configured around the text's ids.
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        self.encode_with(text, true)
    }

    /// `tokenizer.encode(text, add_special_tokens=...)`.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Vec<TokenId> {
        match &self.inner {
            Implementation::Slow(slow) => slow.encode_with(text, add_special_tokens),
            // The loader rules out the fast model's encode errors (see `FastTokenizer::from_file`).
            Implementation::Fast(fast) => fast.encode_with(text, add_special_tokens).unwrap_or_default(),
        }
    }

    /// `tokenizer.decode(ids, skip_special_tokens=True)`; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[TokenId]) -> Result<String> {
        match &self.inner {
            Implementation::Slow(slow) => slow.decode(ids),
            Implementation::Fast(fast) => fast.decode(ids),
        }
    }

    /// `tokenizer.decode(ids, skip_special_tokens=False)`.
    pub fn decode_with_special_tokens(&self, ids: &[TokenId]) -> Result<String> {
        match &self.inner {
            Implementation::Slow(slow) => slow.decode_with_special_tokens(ids),
            Implementation::Fast(fast) => fast.decode_with_special_tokens(ids),
        }
    }

    /// What `id` adds to generated text on its own: its bytes (a SentencePiece piece with `▁` as a
    /// space, a byte-fallback piece `<0xNN>` as that byte), or its text when it is a special token
    /// (control, unknown, or an added token marked special), which decoding skips. Constrained decoding
    /// and log-probabilities read tokens this way.
    pub fn token_surface(&self, id: TokenId) -> Result<TokenSurface> {
        if self.is_special(id) {
            return Ok(TokenSurface::Special(self.piece(id)?.to_string()));
        }
        let byte = match &self.inner {
            Implementation::Slow(slow) => {
                let sp = slow.sentencepiece();
                if matches!(sp.kind(id), Some(PieceType::Control | PieceType::Unknown)) {
                    return Ok(TokenSurface::Special(self.piece(id)?.to_string()));
                }
                sp.byte_value(id)
            }
            Implementation::Fast(fast) => fast.byte_value(id),
        };
        Ok(TokenSurface::Bytes(match byte {
            Some(byte) => vec![byte],
            None => self.piece(id)?.replace(sentencepiece::SPACE_SYMBOL, " ").into_bytes(),
        }))
    }

    /// The vocabulary entry of `id` as written in the tokenizer file.
    fn piece(&self, id: TokenId) -> Result<std::borrow::Cow<'_, str>> {
        match &self.inner {
            Implementation::Slow(slow) => slow.piece_of(id).map(Into::into),
            Implementation::Fast(fast) => fast.piece_of(id).map(Into::into),
        }
    }

    /// A decoder for ids that arrive one at a time (generation).
    pub fn stream(&self) -> StreamDecoder<'_> {
        match &self.inner {
            Implementation::Slow(slow) => StreamDecoder::slow(slow.stream()),
            Implementation::Fast(fast) => StreamDecoder::fast(fast),
        }
    }
}

/// What `tokenizer_image_token` reads: `tokenizer(text).input_ids`, BOS included.
impl crate::prompt::image_tokens::TextEncoder for Tokenizer {
    fn encode_with_bos(&self, text: &str) -> Result<Vec<i64>> {
        Ok(self.encode(text).into_iter().map(i64::from).collect())
    }

    fn bos_id(&self) -> i64 {
        Tokenizer::bos_id(self).map(i64::from).unwrap_or(1)
    }
}
