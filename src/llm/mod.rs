//! Language side: LLaMA decoder with MM-LoRA projections and its KV cache.
