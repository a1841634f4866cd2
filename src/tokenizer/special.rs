//! The special tokens both tokenizers take from their options, and the ids they resolve to.
use std::collections::HashSet;

use super::llama::{SpecialToken, TokenizerOptions};
use super::sentencepiece::TokenId;
use crate::Result;

/// The ids of a tokenizer's special tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub pad: Option<TokenId>,
    /// The ids `decode(skip_special_tokens=True)` drops.
    pub skipped: HashSet<TokenId>,
}

impl SpecialIds {
    /// BOS, EOS and padding of `options` through `id_of`, which refuses a token missing from the
    /// vocabulary; `skipped` as the tokenizer finds them.
    pub(crate) fn resolve(
        options: &TokenizerOptions,
        id_of: impl Fn(&SpecialToken) -> Result<TokenId>,
        skipped: HashSet<TokenId>,
    ) -> Result<Self> {
        let id = |token: &Option<SpecialToken>| token.as_ref().map(&id_of).transpose();
        Ok(Self { bos: id(&options.bos_token)?, eos: id(&options.eos_token)?, pad: id(&options.pad_token)?, skipped })
    }

    pub fn is_special(&self, id: TokenId) -> bool {
        self.skipped.contains(&id)
    }
}

impl TokenizerOptions {
    /// The named special tokens in transformers' order: BOS, EOS, unknown and padding (those set), then
    /// the additional ones.
    pub(crate) fn named_special_tokens(&self) -> impl Iterator<Item = &SpecialToken> {
        [&self.bos_token, &self.eos_token, &self.unk_token, &self.pad_token]
            .into_iter()
            .flatten()
            .chain(&self.additional_special_tokens)
    }
}
