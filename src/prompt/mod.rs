//! Prompts, without tensors: the release's conversation templates and CLI conventions, and the ids of a
//! prompt with its image placeholders. Nothing here knows the model.
pub mod conversation;
pub mod image_tokens;
