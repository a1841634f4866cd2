//! Per-token decode time with the KV cache at position ~100 and ~1000, on a small random MM-LoRA Llama
//! (hidden 256, 4 layers, 8 heads, MLP 688, vocab 1000, LoRA ranks 64/192), CPU fp32, as released and
//! with the language branch merged into the base weights (`arcana-convert --merge-lora`).
//! `cargo run --release --example bench_decode [-- threads]`
use arcana::config::ArcanaConfig;
use arcana::llm::{LlamaForCausalLM, StepInputs};
use arcana::weights::{Checkpoint, WeightLoader};
use common::RandomLlama;
use tch::{Device, Kind, Tensor};

mod common;

const HIDDEN: i64 = 256;
const STEPS: usize = 32;

/// Prefills `prompt` positions, then returns the median seconds of one decode step after them.
fn decode_time(lm: &LlamaForCausalLM, prompt: i64) -> anyhow::Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut cache = lm.model.new_cache(1, prompt + STEPS as i64 + 8)?;
    let embeds = Tensor::randn([1, prompt, HIDDEN], (Kind::Float, Device::Cpu));
    let positions = Tensor::arange(prompt, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let visual = arcana::mm::visual_span::release_visual_mask(1, prompt, Device::Cpu)?;
    let step = StepInputs { position_ids: &positions, attention_mask: None, visual: &visual };
    lm.forward(&embeds, &step, Some(&mut cache), false)?;
    common::median_step_seconds(lm, &mut cache, 1, prompt, None, 4, STEPS)
}

fn main() -> anyhow::Result<()> {
    if let Some(threads) = std::env::args().nth(1) {
        tch::set_num_threads(threads.parse()?);
    }
    println!("threads {}", tch::get_num_threads());
    for merged in [false, true] {
        let dir = tempfile_dir()?;
        let shape = RandomLlama {
            hidden: HIDDEN,
            mlp: 688,
            heads: 8,
            layers: 4,
            vocab: 1000,
            mm_hidden: 32,
            dtype: Kind::Float,
            language_merged: merged,
        };
        shape.write(&dir)?;
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
