//! Time of one decoding step by the number of rows decoded together, at Vicuna-7B width (hidden 4096,
//! MLP 11008, 32 heads, vocabulary 32000, MM-LoRA ranks 64 / 192) with a few decoder layers, each row's
//! KV cache holding `positions` positions: what a batch's step costs against one row's, per mode, and
//! the gain it allows (rows x one row's time / the batch's time).
//! `cargo run --release --example batch_step [-- layers positions threads]`; `MODES=int8,exact` and
//! `ROWS=8` (one row's time then unmeasured) choose what runs, `STEPS` how many steps are timed.
use arcana::config::ArcanaConfig;
use arcana::llm::{KvCache, LlamaForCausalLM, StepInputs};
use arcana::quant::{Quantization, WeightForms};
use arcana::weights::{Checkpoint, WeightLoader};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const HIDDEN: i64 = 4096;
const MLP: i64 = 11008;
const HEADS: i64 = 32;
const VOCAB: i64 = 32000;
/// Steps timed per row count (`STEPS` in the environment: more, for a profile).
fn steps() -> usize {
    std::env::var("STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(8)
}

fn write_checkpoint(dir: &std::path::Path, layers: i64) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "hidden_size": HIDDEN, "intermediate_size": MLP, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "num_hidden_layers": layers, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "mm_hidden_size": 1024,
        "mm_projector_type": "linear"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
    tch::manual_seed(0);
    let randn = |shape: &[i64]| {
        (Tensor::randn(shape, (Kind::Float, Device::Cpu)) / (shape[1] as f64).sqrt()).to_kind(Kind::Half)
    };
    let ones = || Tensor::ones([HIDDEN], (Kind::Half, Device::Cpu));
    let mut tensors = vec![
        ("model.embed_tokens.weight".to_string(), randn(&[VOCAB, HIDDEN])),
        ("model.norm.weight".to_string(), ones()),
        ("lm_head.weight".to_string(), randn(&[VOCAB, HIDDEN])),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{n}.weight"), ones()));
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
            tensors.push((format!("{p}.{name}.weight"), randn(&[o_dim, i_dim])));
            for (branch, rank) in [("V", 64), ("L", 192)] {
                tensors.push((format!("{p}.{name}.{branch}_Slora_A.weight"), randn(&[rank, i_dim])));
                tensors.push((format!("{p}.{name}.{branch}_Slora_B.weight"), randn(&[o_dim, rank]) * 0.1));
            }
        }
    }
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// A cache of `rows` rows holding the same `positions` positions each (one prefill, stacked), in the
/// model's cache form.
fn filled_cache(lm: &LlamaForCausalLM, rows: i64, positions: i64) -> anyhow::Result<KvCache> {
    let mut one = lm.model.new_cache(1, positions)?;
    let embeds = Tensor::randn([1, positions, HIDDEN], (Kind::Float, Device::Cpu)) * 0.02;
    let ids = Tensor::arange(positions, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let language = Tensor::zeros([1, positions], (Kind::Bool, Device::Cpu));
    let step = StepInputs { position_ids: &ids, attention_mask: None, visual: &language };
    lm.model.forward(&embeds, &step, Some(&mut one), false)?;
    let parts = vec![&one; rows as usize];
    Ok(KvCache::stack_right_aligned(&parts, steps() as i64 + 8)?)
}

/// Median seconds of one decoding step of `rows` rows after `positions` cached positions each.
fn step_time(lm: &LlamaForCausalLM, rows: i64, positions: i64) -> anyhow::Result<f64> {
    let mut cache = filled_cache(lm, rows, positions)?;
    let language = Tensor::zeros([rows, 1], (Kind::Bool, Device::Cpu));
    let mut mask = Tensor::ones([rows, positions], (Kind::Int64, Device::Cpu));
    let mut times = Vec::new();
    for s in 0..steps() as i64 + 2 {
        let ids = Tensor::from_slice(&vec![(s * 7) % VOCAB; rows as usize]).view([rows, 1]);
        let token = lm.model.embed(&ids)?;
        let pos = Tensor::full([rows, 1], positions + s, (Kind::Int64, Device::Cpu));
        mask = Tensor::cat(&[&mask, &Tensor::ones([rows, 1], (Kind::Int64, Device::Cpu))], 1);
        let step = StepInputs { position_ids: &pos, attention_mask: Some(&mask), visual: &language };
        let start = Instant::now();
        let logits = lm.forward(&token, &step, Some(&mut cache), false)?.logits;
        let _ = logits.argmax(-1, false).int64_value(&[0, 0]);
        if s >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: i64| -> anyhow::Result<i64> {
        Ok(args.get(i).map(|a| a.parse()).transpose()?.unwrap_or(default))
    };
    let (layers, positions) = (arg(0, 2)?, arg(1, 650)?);
    if let Some(threads) = args.get(2) {
        tch::set_num_threads(threads.parse()?);
    }
    let _guard = tch::no_grad_guard();
    let dir = std::env::temp_dir().join(format!("arcana-batch-step-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    write_checkpoint(&dir, layers)?;
    let config = ArcanaConfig::from_file(&dir.join("config.json"))?;
    let modes: [(&str, WeightForms); 4] = [
        ("exact", WeightForms::default()),
        ("int8", WeightForms { storage: Some(Quantization::Int8), merge_lora: true, ..Default::default() }),
        ("int4", WeightForms { storage: Some(Quantization::Int4), merge_lora: true, ..Default::default() }),
        ("fp16", WeightForms { storage: Some(Quantization::Fp16), merge_lora: true, ..Default::default() }),
    ];
    let only: Option<Vec<String>> = std::env::var("MODES").ok().map(|m| m.split(',').map(String::from).collect());
    println!("{layers} layers at 7B width, {positions} cached positions per row, {} threads", tch::get_num_threads());
    for (name, forms) in modes {
        if only.as_ref().is_some_and(|o| !o.iter().any(|m| m == name)) {
            continue;
        }
        let loader = WeightLoader::new(Checkpoint::open_dir(&dir)?, Kind::Float, Device::Cpu);
        let lm = LlamaForCausalLM::load_with(&loader.root(), &config, forms)?;
        loader.finish()?;
        let one = if std::env::var("ROWS").is_ok() { f64::NAN } else { step_time(&lm, 1, positions)? };
        let counts: Vec<i64> = match std::env::var("ROWS") {
            Ok(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
            Err(_) => vec![1, 2, 4, 8],
        };
        for rows in counts {
            let t = if rows == 1 && one.is_finite() { one } else { step_time(&lm, rows, positions)? };
            println!(
                "{name:5} {rows} rows: {:8.2} ms per step, {:.2}x one row's, gain {:.2}x",
                t * 1e3,
                t / one,
                rows as f64 * one / t
            );
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
