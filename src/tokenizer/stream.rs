//! Decoding ids one at a time, for generation. The pieces of `decode(ids, skip_special_tokens=True)`
//! only depend on what came before them, except a run of byte pieces, whose last character may
//! still be incomplete: that part is held back until it is complete or the run ends.
use super::fast::{FastStream, FastTokenizer};
use super::llama::SlowStream;
use super::sentencepiece::TokenId;
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
