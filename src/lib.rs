//! Arcana on libtorch: CLIP ViT + Query Ladder vision tower, MLP projector and a LLaMA decoder whose
//! projections carry MM-LoRA branches, computing what the PyTorch release computes.
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod layers;
pub mod llm;
pub mod mm;
pub mod model;
pub mod parity;
pub mod prompt;
pub mod quant;
pub mod serve;
mod simd;
mod threads;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use error::{Error, Result};
