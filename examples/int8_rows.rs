//! Time of one int8 projection (fbgemm, each row on its own grid) by the number of rows it multiplies,
//! at the 7B MLP's shapes: what a decoding step of a batch pays per projection.
//! `cargo run --release --example int8_rows [-- threads]`
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
        let int8 = BaseWeight::quantized(Linear { weight, bias: None }, Quantization::Int8)?;
        for rows in [1i64, 2, 4, 8, 16] {
            let x = Tensor::randn([rows, 1, in_dim], (Kind::Float, Device::Cpu));
            for _ in 0..3 {
                let _ = int8.forward(&x)?;
            }
            let repeats = 20;
            let start = Instant::now();
            for _ in 0..repeats {
                let _ = int8.forward(&x)?;
            }
            let ms = start.elapsed().as_secs_f64() * 1e3 / repeats as f64;
            println!("{in_dim}x{out_dim}, {rows:2} rows: {ms:7.3} ms ({:.3} ms per row)", ms / rows as f64);
        }
    }
    Ok(())
}
