//! Time of one fp32 projection at Vicuna-7B's shapes by the number of input rows: the decoder's dense
//! weight path (the project's few-row kernel for 2-16 rows of a decoding step) beside libtorch's
//! `linear` on the same input, medians of 12 calls.
//! `cargo run --release --example few_row_projection [-- threads]`; with `ARCANA_NO_OPENMP_TEAM=1` the
//! kernel runs on threads of its own instead of libtorch's OpenMP team.
use arcana::layers::Linear;
use arcana::quant::BaseWeight;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..12)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    if let Some(threads) = std::env::args().nth(1) {
        tch::set_num_threads(threads.parse()?);
    }
    let _guard = tch::no_grad_guard();
    println!("{} threads", tch::get_num_threads());
    for (out_dim, in_dim) in [(11008i64, 4096i64), (4096, 11008), (4096, 4096), (32000, 4096)] {
        let weight = Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu));
        let dense = BaseWeight::Dense(Linear { weight: weight.shallow_clone(), bias: None });
        for rows in [1i64, 2, 4, 8] {
            let x = Tensor::randn([rows, 1, in_dim], (Kind::Float, Device::Cpu));
            let ours = median_ms(|| drop(dense.forward(&x).expect("forward")));
            let libtorch = median_ms(|| drop(x.linear(&weight, None::<&Tensor>)));
            println!("{out_dim}x{in_dim}, {rows} rows: {ours:6.2} ms, libtorch's linear {libtorch:6.2} ms");
        }
    }
    Ok(())
}
