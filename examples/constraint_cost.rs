//! Per-token cost of constrained decoding with a real 32000-token SentencePiece vocabulary: the mask
//! (llguidance's allowed set, turned into a masked copy of the logits) and the advance, on random fp32
//! logits, for a JSON schema, any JSON object, a regex and a Lark grammar; and the one-time vocabulary
//! build. Set beside a decode step's time (README, Benchmark) it gives the share masking takes.
//! `cargo run --release --example constraint_cost -- path/to/tokenizer.model`
//! (scripts/setup-python.sh puts one in ~/.cache/arcana/tokenizers/).
use arcana::generate::constraint::{Constraint, ConstraintCompiler, Progress};
use arcana::tokenizer::{Tokenizer, TokenizerOptions};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const WIDTH: usize = 32000;
const ANSWERS: usize = 20;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: constraint_cost TOKENIZER_MODEL"))?;
    tch::set_num_threads(1);
    let tokenizer = Tokenizer::from_model_file(path.as_ref(), TokenizerOptions::default())?;
    let eos = i64::from(tokenizer.eos_id().unwrap_or(2));
    let start = Instant::now();
    let compiler = ConstraintCompiler::new(&tokenizer, WIDTH, eos)?;
    println!("vocabulary build: {:.1} ms (once per engine)", start.elapsed().as_secs_f64() * 1e3);
    let schema = serde_json::json!({"type": "object", "properties": {
        "shop": {"type": "string", "maxLength": 12},
        "items": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "what": {"type": "string", "maxLength": 10}, "count": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["what", "count"]}}},
        "required": ["shop", "items"]});
    let cases = [
        ("JSON schema", Constraint::JsonSchema(schema)),
        ("any JSON object", Constraint::JsonObject),
        ("regex", Constraint::Regex("[A-Z][a-z]{2,8}( [a-z]{2,8}){0,6}\\.".into())),
        (
            "Lark grammar",
            Constraint::Lark("start: call\ncall: \"add(\" INT \", \" INT \")\"\nINT: /[0-9]{1,4}/".into()),
        ),
    ];
    tch::manual_seed(0);
    for (name, constraint) in cases {
        let (mut tokens, mut mask_seconds, mut advance_seconds, mut compile_seconds) = (0usize, 0.0, 0.0, 0.0);
        for _ in 0..ANSWERS {
            let start = Instant::now();
            let mut matcher = compiler.compile(&constraint)?;
            compile_seconds += start.elapsed().as_secs_f64();
            for _ in 0..64 {
                let logits = Tensor::randn([1, WIDTH as i64], (Kind::Float, Device::Cpu));
                let start = Instant::now();
                let Some(masked) = matcher.mask(&logits)? else { break };
                mask_seconds += start.elapsed().as_secs_f64();
                let id = masked.argmax(-1, false).int64_value(&[0]);
                let start = Instant::now();
                let progress = matcher.advance(id)?;
                advance_seconds += start.elapsed().as_secs_f64();
                tokens += 1;
                if id == eos || progress == Progress::Complete {
                    break;
                }
            }
        }
        let per_token = |seconds: f64| seconds / tokens as f64 * 1e6;
        println!(
            "{name}: {tokens} tokens, mask {:.0} us/token, advance {:.0} us/token, compile {:.2} ms/answer",
            per_token(mask_seconds),
            per_token(advance_seconds),
            compile_seconds / ANSWERS as f64 * 1e3
        );
    }
    Ok(())
}
