//! Constrained decoding: before each token is chosen, every token the constraint (a JSON schema, any
//! JSON object, a regular expression or a Lark grammar) cannot continue with gets a score of minus
//! infinity, for greedy choice and sampling alike; EOS is allowed only where the constraint may end.
//! The grammar engine is llguidance; it reads the vocabulary as bytes from our own tokenizers
//! ([`Tokenizer::token_surface`]), so SentencePiece's `▁` and byte-fallback pieces mean what they
//! decode to, and special tokens never match text.
use crate::error::{Error, Result};
use crate::tokenizer::{TokenSurface, Tokenizer};
use llguidance::api::{GrammarInit, ParserLimits, TopLevelGrammar};
use llguidance::{Logger, ParserFactory};
use std::sync::Arc;
use tch::Tensor;
use toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// What an answer must conform to.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this JSON schema (local `$ref`s only).
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression as a whole (Rust `regex` syntax).
    Regex(String),
    /// Text of this Lark grammar (llguidance's dialect, which also embeds `%json` schemas).
    Lark(String),
}

impl Constraint {
    /// The grammar llguidance compiles. JSON without a whitespace setting of the client's gets no
    /// free whitespace between tokens: a model that drifts would otherwise spend its tokens on it.
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(compact_json(serde_json::json!({
                "type": "object"
            }))),
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact_json(schema.clone())),
            Constraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }

    /// A short name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonObject => "JSON object",
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "grammar",
        }
    }
}

fn compact_json(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// The model's vocabulary as the grammar engine reads it, built once per engine (about 0.2 s for
/// 32000 tokens): every id below the logits' width, ids the tokenizer lacks as never-allowed entries.
pub struct ConstraintCompiler {
    factory: ParserFactory,
    width: usize,
}

/// Our tokenizer seen by llguidance: the trie, and a tokenization of forced text that llguidance is
/// told is not canonical, so the model still chooses how to spell it.
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(bytes)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// llguidance's errors (multi-line, with a state dump when verbose) as one line.
fn first_line(error: impl std::fmt::Display) -> String {
    error.to_string().lines().next().unwrap_or_default().trim().to_string()
}

impl ConstraintCompiler {
    /// The vocabulary of `tokenizer` over `width` logits, ending at `eos`.
    pub fn new(tokenizer: &Tokenizer, width: usize, eos: i64) -> Result<Self> {
        let eos = TokenId::try_from(eos)
            .ok()
            .filter(|&id| (id as usize) < width)
            .ok_or_else(|| Error::Engine(format!("EOS id {eos} is outside the {width} logits")))?;
        let vocab_size = tokenizer.vocab_size();
        let words = (0..width)
            .map(|id| {
                let id = id as u32;
                if id as usize >= vocab_size {
                    return Ok(Vec::new());
                }
                Ok(match tokenizer.token_surface(id)? {
                    TokenSurface::Bytes(bytes) => bytes,
                    TokenSurface::Special(text) => {
                        let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                        marked.extend_from_slice(text.as_bytes());
                        marked
                    }
                })
            })
            .collect::<Result<Vec<Vec<u8>>>>()?;
        if !words.iter().any(|w| w.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER)) {
            return Err(Error::Engine("constrained decoding needs a vocabulary with special tokens".into()));
        }
        let mut info = TokRxInfo::new(width as u32, eos);
        info.tok_bos = tokenizer.bos_id();
        let env: TokEnv = Arc::new(Vocabulary { trie: TokTrie::from(&info, &words) });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| Error::Engine(format!("grammar engine: {}", first_line(e))))?;
        factory.set_stderr_log_level(0);
        Ok(Self { factory, width })
    }

    /// A matcher for one answer; a constraint the engine cannot compile (or one past llguidance's
    /// size and work limits) is refused with the reason.
    pub fn compile(&self, constraint: &Constraint) -> Result<Matcher> {
        let limits = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
        let parser = self
            .factory
            .create_parser_from_init_ext(
                GrammarInit::Serialized(constraint.grammar()),
                Logger::new(0, 0),
                InferenceCapabilities::default(),
                limits,
            )
            .map_err(|e| Error::InvalidInput(format!("the {} cannot be used: {}", constraint.kind(), first_line(e))))?;
        let eos = self.factory.tok_env().tok_trie().eos_token();
        Ok(Matcher { inner: llguidance::Matcher::new(Ok(parser)), eos: eos as i64, width: self.width as i64 })
    }
}

/// One answer's place in its constraint.
pub struct Matcher {
    inner: llguidance::Matcher,
    eos: i64,
    width: i64,
}

/// Where a constraint stands after a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More may follow.
    Open,
    /// The constraint is complete: nothing may follow.
    Complete,
}

impl Matcher {
    /// `logits` `[1, width]` with every token the constraint does not allow at minus infinity; `None`
    /// when it allows none.
    pub fn mask(&mut self, logits: &Tensor) -> Result<Option<Tensor>> {
        let width = logits.size().last().copied().unwrap_or(0);
        if width != self.width {
            return Err(Error::Engine(format!("{width} logits for a vocabulary of {}", self.width)));
        }
        let allowed = self.inner.compute_mask_or_eos().map_err(|e| self.failure(e))?;
        if allowed.num_set() == 0 {
            return Ok(None);
        }
        // Walks the set bits only, skipping empty words: a structure allows few tokens at most steps.
        let mut mask = vec![false; self.width as usize];
        allowed.iter_set_entries(|id| {
            if let Some(slot) = mask.get_mut(id) {
                *slot = true;
            }
        });
        let allowed = mask;
        let allowed = Tensor::f_from_slice(&allowed)?.f_to_device(logits.device())?.f_view([1, self.width])?;
        Ok(Some(logits.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?))
    }

    /// Takes the chosen token (one the last mask allowed).
    pub fn advance(&mut self, id: i64) -> Result<Progress> {
        if id == self.eos {
            return Ok(Progress::Complete);
        }
        let token = TokenId::try_from(id).map_err(|_| Error::Engine(format!("token {id} out of range")))?;
        self.inner.consume_token(token).map_err(|e| self.failure(e))?;
        Ok(if self.inner.is_stopped() { Progress::Complete } else { Progress::Open })
    }

    fn failure(&self, e: impl std::fmt::Display) -> Error {
        Error::Engine(format!("constrained decoding failed: {}", first_line(e)))
    }
}
