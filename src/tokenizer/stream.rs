//! Decoding ids one at a time, for generation. The pieces of `decode(ids, skip_special_tokens=True)`
//! only depend on what came before them, except a run of byte pieces, whose last character may
//! still be incomplete: that part is held back until it is complete or the run ends.
use super::llama::Tokenizer;
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
    tokenizer: &'t Tokenizer,
    pieces: PieceDecoder<'t>,
    seen_first: bool,
    held: String,
}

impl<'t> StreamDecoder<'t> {
    pub(crate) fn new(tokenizer: &'t Tokenizer) -> Self {
        StreamDecoder {
            tokenizer,
            pieces: tokenizer.new_piece_decoder(),
            seen_first: false,
            held: String::new(),
        }
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
            self.pieces
                .push_piece(piece.strip_prefix(SPACE_SYMBOL).unwrap_or(piece), &mut out);
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
