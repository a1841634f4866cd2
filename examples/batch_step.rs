//! Time of one decoding step by the number of rows decoded together, at Vicuna-7B width (hidden 4096,
//! MLP 11008, 32 heads, vocabulary 32000, MM-LoRA ranks 64 / 192) with a few decoder layers, each row's
//! KV cache holding `positions` positions: what a batch's step costs against one row's, per mode, and
//! the gain it allows (rows x one row's time / the batch's time).
//! `cargo run --release --example batch_step [-- layers positions threads]`; `MODES=int8,exact` and
//! `ROWS=8` choose what runs (ratios to one row's time only when 1 is listed first), `STEPS` how many
//! steps are timed.
use arcana::config::ArcanaConfig;
use arcana::llm::{KvCache, LlamaForCausalLM, StepInputs};
use arcana::quant::{Quantization, WeightForms};
use arcana::weights::{Checkpoint, WeightLoader};
use common::RandomLlama;
use tch::{Device, Kind, Tensor};

mod common;

const HIDDEN: i64 = 4096;

/// Steps timed per row count (`STEPS` in the environment: more, for a profile).
fn steps() -> usize {
    std::env::var("STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(8)
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
    let mask = Tensor::ones([rows, positions], (Kind::Int64, Device::Cpu));
    common::median_step_seconds(lm, &mut cache, rows, positions, Some(mask), 2, steps())
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
    let shape = RandomLlama {
        hidden: HIDDEN,
        mlp: 11008,
        heads: 32,
        layers,
        vocab: 32000,
        mm_hidden: 1024,
        dtype: Kind::Half,
        language_merged: false,
    };
    shape.write(&dir)?;
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
        let counts: Vec<i64> = match std::env::var("ROWS") {
            Ok(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
            Err(_) => vec![1, 2, 4, 8],
        };
        let mut one = f64::NAN;
        for rows in counts {
            let t = step_time(&lm, rows, positions)?;
            if rows == 1 {
                one = t;
            }
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
