//! What the decoder examples share: a random MM-LoRA Llama checkpoint in the release's layout, and the
//! timing of decoding steps on it.
use arcana::llm::{KvCache, LlamaForCausalLM, StepInputs};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The shape and form of a random checkpoint.
pub struct RandomLlama {
    pub hidden: i64,
    pub mlp: i64,
    pub heads: i64,
    pub layers: i64,
    pub vocab: i64,
    pub mm_hidden: i64,
    /// The dtype its tensors are stored in.
    pub dtype: Kind,
    /// The language branch folded into each base weight (`arcana-convert --merge-lora`, scaling 2).
    pub language_merged: bool,
}

impl RandomLlama {
    /// Writes `config.json` and `model.safetensors` into `dir`: N(0, 1 / in) weights, unit norms, MM-LoRA
    /// ranks 64 (visual) and 192 (language) with the up weights a tenth as large.
    pub fn write(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let config = serde_json::json!({
            "hidden_size": self.hidden, "intermediate_size": self.mlp, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads, "num_hidden_layers": self.layers, "vocab_size": self.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "mm_hidden_size": self.mm_hidden,
            "mm_projector_type": "linear", "mm_lora_language_merged": self.language_merged
        });
        std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
        tch::manual_seed(0);
        let randn = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)) / (shape[1] as f64).sqrt();
        let ones = || Tensor::ones([self.hidden], (Kind::Float, Device::Cpu));
        // Each tensor takes the stored dtype as it is made, so the fp32 checkpoint never exists whole.
        let stored = |name: String, t: Tensor| (name, t.to_kind(self.dtype));
        let mut tensors = vec![
            stored("model.embed_tokens.weight".into(), randn(&[self.vocab, self.hidden])),
            stored("model.norm.weight".into(), ones()),
            stored("lm_head.weight".into(), randn(&[self.vocab, self.hidden])),
        ];
        let (h, i) = (self.hidden, self.mlp);
        for layer in 0..self.layers {
            let p = format!("model.layers.{layer}");
            for n in ["input_layernorm", "post_attention_layernorm"] {
                tensors.push(stored(format!("{p}.{n}.weight"), ones()));
            }
            let projections = [
                ("self_attn.q_proj", h, h),
                ("self_attn.k_proj", h, h),
                ("self_attn.v_proj", h, h),
                ("self_attn.o_proj", h, h),
                ("mlp.gate_proj", h, i),
                ("mlp.up_proj", h, i),
                ("mlp.down_proj", i, h),
            ];
            for (name, i_dim, o_dim) in projections {
                let mut weight = randn(&[o_dim, i_dim]);
                for (branch, rank) in [("V", 64), ("L", 192)] {
                    let (a, b) = (randn(&[rank, i_dim]), randn(&[o_dim, rank]) * 0.1);
                    if self.language_merged && branch == "L" {
                        weight += b.matmul(&a) * 2.0;
                    }
                    tensors.push(stored(format!("{p}.{name}.{branch}_Slora_A.weight"), a));
                    tensors.push(stored(format!("{p}.{name}.{branch}_Slora_B.weight"), b));
                }
                tensors.push(stored(format!("{p}.{name}.weight"), weight));
            }
        }
        Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
        Ok(())
    }
}

/// Median seconds of one decoding step, each of the cache's rows taking one text token after `past`
/// cached positions: `warmup` steps, then `steps` timed ones. `mask`, the rows' attention mask over the
/// cache, grows by one column per step; without it the step has none (one row, no padding).
pub fn median_step_seconds(
    lm: &LlamaForCausalLM,
    cache: &mut KvCache,
    rows: i64,
    past: i64,
    mut mask: Option<Tensor>,
    warmup: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    let vocab = lm.model.embed_tokens.size()[0];
    let language = Tensor::zeros([rows, 1], (Kind::Bool, Device::Cpu));
    let mut times = Vec::new();
    for s in 0..(warmup + steps) as i64 {
        let ids = Tensor::from_slice(&vec![(s * 7) % vocab; rows as usize]).view([rows, 1]);
        let token = lm.model.embed(&ids)?;
        let pos = Tensor::full([rows, 1], past + s, (Kind::Int64, Device::Cpu));
        if let Some(m) = &mut mask {
            *m = Tensor::cat(&[&*m, &Tensor::ones([rows, 1], (Kind::Int64, Device::Cpu))], 1);
        }
        let step = StepInputs { position_ids: &pos, attention_mask: mask.as_ref(), visual: &language };
        let start = Instant::now();
        let logits = lm.forward(&token, &step, Some(cache), false)?.logits;
        let _ = logits.argmax(-1, false).int64_value(&[0, 0]);
        if s >= warmup as i64 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
