//! Multimodal glue: projector, prompt building, conversation templates and embedding splicing.
pub mod conversation;
pub mod projector;
pub mod prompt;
pub mod splice;
