//! Multimodal glue between the vision side and the decoder: the projector, the splice of image
//! features into the token embeddings, and which positions take the visual LoRA branch.
pub mod projector;
pub mod splice;
pub mod visual_span;
