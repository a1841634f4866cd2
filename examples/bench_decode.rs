//! Per-token decode time with the KV cache at position ~100 and ~1000, on a small random MM-LoRA Llama
//! (hidden 256, 4 layers, 8 heads, MLP 688, vocab 1000, LoRA ranks 64/192), CPU fp32, as released and
//! with the language branch merged into the base weights (`arcana-convert --merge-lora`).
//! `cargo run --release --example bench_decode [-- threads]`
use arcana::config::ArcanaConfig;
use arcana::llm::{LlamaForCausalLM, StepInputs};
use arcana::weights::{Checkpoint, WeightLoader};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const HIDDEN: i64 = 256;
const LAYERS: i64 = 4;
const MLP: i64 = 688;
const VOCAB: i64 = 1000;
const STEPS: usize = 32;

fn write_checkpoint(dir: &std::path::Path, merged: bool) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "hidden_size": HIDDEN, "intermediate_size": MLP, "num_attention_heads": 8, "num_key_value_heads": 8,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "mm_hidden_size": 32, "mm_projector_type": "linear", "mm_lora_language_merged": merged
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
    tch::manual_seed(0);
    let randn = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)) / (shape[1] as f64).sqrt();
    let mut tensors = vec![
        ("model.embed_tokens.weight".to_string(), randn(&[VOCAB, HIDDEN])),
        ("model.norm.weight".to_string(), Tensor::ones([HIDDEN], (Kind::Float, Device::Cpu))),
        ("lm_head.weight".to_string(), randn(&[VOCAB, HIDDEN])),
    ];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{n}.weight"), Tensor::ones([HIDDEN], (Kind::Float, Device::Cpu))));
        }
        let projections = [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", HIDDEN, HIDDEN),
            ("self_attn.v_proj", HIDDEN, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", HIDDEN, MLP),
            ("mlp.up_proj", HIDDEN, MLP),
            ("mlp.down_proj", MLP, HIDDEN),
        ];
        for (name, i_dim, o_dim) in projections {
            let mut weight = randn(&[o_dim, i_dim]);
            for (branch, rank) in [("V", 64), ("L", 192)] {
                let (a, b) = (randn(&[rank, i_dim]), randn(&[o_dim, rank]) * 0.1);
                if merged && branch == "L" {
                    weight += b.matmul(&a) * 2.0;
                }
                tensors.push((format!("{p}.{name}.{branch}_Slora_A.weight"), a));
                tensors.push((format!("{p}.{name}.{branch}_Slora_B.weight"), b));
            }
            tensors.push((format!("{p}.{name}.weight"), weight));
        }
    }
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// Prefills `prompt` positions, then returns the mean seconds of one decode step after them.
fn decode_time(lm: &LlamaForCausalLM, prompt: i64) -> anyhow::Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut cache = lm.model.new_cache(1, prompt + STEPS as i64 + 8)?;
    let embeds = Tensor::randn([1, prompt, HIDDEN], (Kind::Float, Device::Cpu));
    let positions = Tensor::arange(prompt, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let visual = arcana::mm::visual_span::release_visual_mask(1, prompt, Device::Cpu)?;
    let step = StepInputs { position_ids: &positions, attention_mask: None, visual: &visual };
    lm.forward(&embeds, &step, Some(&mut cache), false)?;
    let language = Tensor::zeros([1, 1], (Kind::Bool, Device::Cpu));
    let mut times = Vec::new();
    for s in 0..STEPS as i64 + 4 {
        let token = lm.model.embed(&Tensor::from_slice(&[(s * 7) % VOCAB]).view([1, 1]))?;
        let pos = Tensor::from_slice(&[prompt + s]).view([1, 1]);
        let step = StepInputs { position_ids: &pos, attention_mask: None, visual: &language };
        let start = Instant::now();
        let logits = lm.forward(&token, &step, Some(&mut cache), false)?.logits;
        let _ = logits.argmax(-1, false).int64_value(&[0, 0]);
        if s >= 4 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> anyhow::Result<()> {
    if let Some(threads) = std::env::args().nth(1) {
        tch::set_num_threads(threads.parse()?);
    }
    println!("threads {}", tch::get_num_threads());
    for merged in [false, true] {
        let dir = tempfile_dir()?;
        write_checkpoint(&dir, merged)?;
        let config = ArcanaConfig::from_file(&dir.join("config.json"))?;
        let loader = WeightLoader::new(Checkpoint::open_dir(&dir)?, Kind::Float, Device::Cpu);
        let lm = LlamaForCausalLM::load(&loader.root(), &config)?;
        loader.finish()?;
        let label = if merged { "language branch merged" } else { "as released" };
        decode_time(&lm, 100)?; // warm-up: first-use allocations and kernel dispatch
        for prompt in [100, 1000] {
            let t = decode_time(&lm, prompt)?;
            println!("{label}: decode step at position ~{prompt}: {:.3} ms (median of {STEPS})", t * 1e3);
        }
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("arcana-bench-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
