//! Load: 32 concurrent clients through the controller to two workers on the cli-tiny checkpoint. Every
//! answer must be the greedy answer of its own prompt (no interleaving between streams), every stream's
//! text must only grow, and both workers must take requests. Prints requests/s, time to first chunk
//! p50/p99 and each process's peak RSS (`cargo test --test serve_load -- --nocapture`). Skips with a
//! message where the Python environment is missing.
mod common;

use common::serve::{client, start, wait_ready, Server};

use serde_json::{json, Value};
use std::io::Read;
use std::time::{Duration, Instant};

/// Streams one request, returning (time to the first chunk, the chunks' texts).
fn stream(url: &str, body: &Value) -> (Duration, Vec<String>) {
    let start = Instant::now();
    let mut response = client().post(format!("{url}/worker_generate_stream")).json(body).send().unwrap();
    let (mut buffer, mut first, mut texts) = (Vec::new(), None, Vec::new());
    let mut piece = [0u8; 4096];
    loop {
        let n = response.read(&mut piece).unwrap();
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| start.elapsed());
        buffer.extend_from_slice(&piece[..n]);
        while let Some(end) = buffer.iter().position(|&b| b == 0) {
            let chunk: Vec<u8> = buffer.drain(..=end).take(end).collect();
            let value: Value = serde_json::from_slice(&chunk).unwrap();
            assert_eq!(value["error_code"], 0, "{value}");
            texts.push(value["text"].as_str().unwrap().to_string());
        }
    }
    assert!(buffer.is_empty(), "stream ended mid-chunk");
    (first.unwrap_or_default(), texts)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn thirty_two_clients_through_the_controller_to_two_workers() {
    let Some(dir) = common::cli_fixtures() else { return };
    let controller = start(dir, &["controller"]);
    let workers: Vec<Server> = (0..2)
        .map(|_| start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &controller.url]))
        .collect();
    for w in &workers {
        wait_ready(&w.url);
    }
    common::serve::wait_registered(&controller.url, &["arcana-cli-tiny-v1"]);
    // Four prompts, eight clients each: each answer must equal its prompt's solo answer.
    let prompts: Vec<String> = ["Hello", "Name three colors.", "Count to five.", "What is a cat?"]
        .iter()
        .map(|q| {
            format!("A chat between a curious human and an artificial intelligence assistant. USER: {q} ASSISTANT:")
        })
        .collect();
    let body = |p: &str| json!({"model": "arcana-cli-tiny-v1", "prompt": p, "temperature": 0, "max_new_tokens": 32});
    let solo: Vec<String> =
        prompts.iter().map(|p| stream(&workers[0].url, &body(p)).1.last().cloned().unwrap()).collect();

    let start = Instant::now();
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let (url, prompt) = (controller.url.clone(), prompts[i % prompts.len()].clone());
            let request = body(&prompt);
            std::thread::spawn(move || (i, stream(&url, &request)))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = start.elapsed();
    let mut first_chunks = Vec::new();
    for (i, (first, texts)) in &results {
        let expected = &solo[i % prompts.len()];
        assert_eq!(texts.last(), Some(expected), "client {i}: answer differs from its solo run");
        assert!(texts.windows(2).all(|w| w[1].starts_with(&w[0])), "client {i}: the cumulative text went back");
        first_chunks.push(*first);
    }
    first_chunks.sort();
    let metrics: Vec<String> =
        workers.iter().map(|w| client().get(format!("{}/metrics", w.url)).send().unwrap().text().unwrap()).collect();
    let served = |m: &String| -> u64 {
        m.lines().find_map(|l| l.strip_prefix("arcana_requests_total ")).unwrap().parse().unwrap()
    };
    println!(
        "32 clients, 2 workers: {:.2} requests/s ({:.1} s), time to first chunk p50 {:.2} s p99 {:.2} s; \
         requests per worker {:?}; peak RSS MiB: controller {:.0}, workers {:.0} and {:.0}",
        32.0 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        percentile(&first_chunks, 0.5).as_secs_f64(),
        percentile(&first_chunks, 0.99).as_secs_f64(),
        metrics.iter().map(served).collect::<Vec<_>>(),
        controller.peak_rss_mib(),
        workers[0].peak_rss_mib(),
        workers[1].peak_rss_mib(),
    );
    assert!(
        metrics.iter().all(|m| served(m) >= 8),
        "shortest_queue should spread the load: {:?}",
        metrics.iter().map(served).collect::<Vec<_>>()
    );
}
