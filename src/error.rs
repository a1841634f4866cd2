//! The crate-wide error type. Every variant names what went wrong and where (file, tensor, field).
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{path}: config field `{field}`: {message}")]
    Config { path: PathBuf, field: String, message: String },

    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: shard index: {message}")]
    ShardIndex { path: PathBuf, message: String },

    #[error("missing tensor `{name}` (looked in {looked_in})")]
    MissingTensor { name: String, looked_in: String },

    #[error("{path}: unexpected tensor `{name}` (the model has no such parameter)")]
    UnexpectedTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<i64>, found: Vec<i64> },

    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },

    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("prompt: {0}")]
    Prompt(String),

    /// The prompt fills the model's context: nothing can be generated (servers answer this with the
    /// release's "Exceeds max token length" reply).
    #[error("prompt: the prompt takes {positions} positions (image features included), which leaves no room in the model's context of {context}")]
    ContextFull { positions: i64, context: i64 },

    /// A device map, memory budget or placement that cannot be used.
    #[error("device placement: {0}")]
    Placement(String),

    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The engine thread stopped, or an answer ended before it finished.
    #[error("engine: {0}")]
    Engine(String),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
