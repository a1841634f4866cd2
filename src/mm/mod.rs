//! Multimodal glue: projector, prompt building, conversation templates and embedding splicing.
pub mod conversation;
pub mod prompt;
