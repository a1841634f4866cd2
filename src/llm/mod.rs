//! Language side: LLaMA decoder (transformers 4.37.2, eager) with MM-LoRA projections and its KV cache.
pub mod attention;
pub mod cache;
pub mod fp16_attention;
pub mod llama;
pub mod mask;
pub mod mlp;
pub mod mmlora;
pub mod norm;
pub mod placement;
pub mod rope;

pub use cache::KvCache;
pub use llama::{CausalLmOutput, DecoderLayer, LlamaForCausalLM, LlamaModel, LlamaOutput, StepInputs};
pub use mmlora::{MmLoraLinear, MmLoraMode};
