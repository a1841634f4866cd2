//! Time of one compact projection (int8 through fbgemm, int4 through the packed kernel, fp16 weights
//! through fbgemm) by the number of rows it multiplies, at the 7B MLP's shapes: what a decoding step of a
//! batch pays per projection, and the weight bytes it reads per second.
//! `cargo run --release --example compact_rows [-- threads]`
use arcana::layers::Linear;
use arcana::quant::{BaseWeight, Quantization};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    if let Some(threads) = std::env::args().nth(1) {
        tch::set_num_threads(threads.parse()?);
    }
    let _guard = tch::no_grad_guard();
    for (in_dim, out_dim) in [(4096, 11008), (11008, 4096)] {
        let weight = Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu)) / (in_dim as f64).sqrt();
        for mode in [Quantization::Int8, Quantization::Int4, Quantization::Fp16] {
            let compact = BaseWeight::quantized(Linear { weight: weight.copy(), bias: None }, mode)?;
            let bytes = compact.bytes() as f64;
            for rows in [1i64, 2, 4, 8, 16] {
                let x = Tensor::randn([rows, 1, in_dim], (Kind::Float, Device::Cpu));
                for _ in 0..3 {
                    let _ = compact.forward(&x)?;
                }
                let repeats = 20;
                let start = Instant::now();
                for _ in 0..repeats {
                    let _ = compact.forward(&x)?;
                }
                let seconds = start.elapsed().as_secs_f64() / repeats as f64;
                println!(
                    "{mode:?} {in_dim}x{out_dim}, {rows:2} rows: {:7.3} ms ({:.3} ms per row), weights read at {:.1} GB/s",
                    seconds * 1e3,
                    seconds * 1e3 / rows as f64,
                    bytes / seconds / 1e9
                );
            }
        }
    }
    Ok(())
}
