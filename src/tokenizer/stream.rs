//! Decoding ids one at a time, for generation. The pieces of `decode(ids, skip_special_tokens=True)`
//! only depend on what came before them, except a run of byte pieces, whose last character may
//! still be incomplete: that part is held back until it is complete or the run ends.
use super::fast::FastTokenizer;
use super::llama::LlamaTokenizer;
use super::sentencepiece::{PieceDecoder, TokenId, SPACE_SYMBOL};
use crate::Result;

/// Incremental `decode(..., skip_special_tokens=True)`: the strings returned by [`push`] and
/// [`finish`] concatenate to the full decode, and never end inside a character.
///
/// When the tokenizer config sets `clean_up_tokenization_spaces`, whose rewrites reach across
/// tokens, all text is held until [`finish`].
///
/// [`push`]: StreamDecoder::push
/// [`finish`]: StreamDecoder::finish
#[derive(Debug, Clone)]
pub struct StreamDecoder<'t> {
    inner: Stream<'t>,
}

#[derive(Debug, Clone)]
enum Stream<'t> {
    Slow(SlowStream<'t>),
    Fast(FastStream<'t>),
}

impl<'t> StreamDecoder<'t> {
    pub(crate) fn slow(stream: SlowStream<'t>) -> Self {
        StreamDecoder { inner: Stream::Slow(stream) }
    }

    pub(crate) fn fast(tokenizer: &'t FastTokenizer) -> Self {
        StreamDecoder { inner: Stream::Fast(FastStream::new(tokenizer)) }
    }

    /// Adds one id; returns the text that is now final (often empty). Special tokens add nothing.
    /// An id outside the vocabulary is an error and leaves the decoder as it was.
    pub fn push(&mut self, id: TokenId) -> Result<String> {
        match &mut self.inner {
            Stream::Slow(stream) => stream.push(id),
            Stream::Fast(stream) => stream.push(id),
        }
    }

    /// Ends the sequence: bytes that never completed a character come out as U+FFFD.
    pub fn finish(self) -> String {
        match self.inner {
            Stream::Slow(stream) => stream.finish(),
            Stream::Fast(stream) => stream.finish(),
        }
    }
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
        if self.tokenizer.is_special(id) {
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

/// The fast tokenizer's stream. Its byte-fallback decoder turns a whole run of byte tokens into
/// U+FFFD when any byte of the run is invalid, so a run can change until it ends: text is released
/// up to the last token that is neither a byte token nor skipped (a skipped special token joins the
/// runs on its sides). Each push decodes the ids before that point again; generation lengths keep
/// that cheap.
#[derive(Debug, Clone)]
pub(crate) struct FastStream<'t> {
    tokenizer: &'t FastTokenizer,
    ids: Vec<TokenId>,
    /// How many ids end in a token that a later id cannot change.
    settled: usize,
    released: String,
}

impl<'t> FastStream<'t> {
    fn new(tokenizer: &'t FastTokenizer) -> Self {
        FastStream { tokenizer, ids: Vec::new(), settled: 0, released: String::new() }
    }

    fn push(&mut self, id: TokenId) -> Result<String> {
        self.tokenizer.check_id(id)?;
        self.ids.push(id);
        if self.tokenizer.is_special(id) || self.tokenizer.is_byte_token(id) {
            return Ok(String::new());
        }
        self.settled = self.ids.len();
        if self.tokenizer.clean_up_enabled() {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode_raw(&self.ids[..self.settled])?;
        // Text that does not extend what was released waits for `finish`.
        match text.strip_prefix(self.released.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.released.push_str(&new);
                Ok(new)
            }
            _ => Ok(String::new()),
        }
    }

    fn finish(self) -> String {
        // The ids were checked on push, so decoding them again cannot fail.
        let text = self.tokenizer.decode(&self.ids).unwrap_or_default();
        match text.strip_prefix(self.released.as_str()) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        }
    }
}
