//! SentencePiece tokenizer equal to the slow `LlamaTokenizer` of transformers 4.37.2.
//!
//! [`SentencePiece`] reads `tokenizer.model` (a hand-read protobuf) and encodes/decodes as
//! sentencepiece 0.1.99 does; [`Tokenizer`] adds what `LlamaTokenizer` does around it (special
//! tokens in text, `legacy`, BOS/EOS, `decode(skip_special_tokens=True)`); [`StreamDecoder`]
//! decodes generated ids one at a time.
mod bpe;
mod folder;
mod llama;
mod proto;
mod sentencepiece;
mod stream;
mod utf8_bytes;

pub use llama::{SpecialToken, Tokenizer, TokenizerOptions};
pub use sentencepiece::{SentencePiece, TokenId};
pub use stream::StreamDecoder;
