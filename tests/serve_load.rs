//! Load through the controller to two workers on the cli-tiny checkpoint: rounds of 1, 8 and 32
//! concurrent clients, each round 32 requests (every client sends its next request when its previous
//! answer has ended), four text prompts and one with an image. Every answer must be the greedy answer
//! of its own prompt alone (no interleaving between streams), every stream's text must only grow, and
//! both workers must take requests when 32 clients come at once.
//!
//! Prints per round what a user feels (`cargo test --test serve_load -- --nocapture`): requests/s, time
//! to first chunk p50/p99 (from sending the request), and decode tokens/s per stream: each stream's own
//! rate, the tokens after its first chunk over the time from its first to its last chunk (the requests
//! ask `logprobs: true`, so that every chunk carries one entry per token since the previous chunk),
//! median and slowest stream. Speed is printed, never asserted; `parity/bench/load.py` measures it on
//! the benchmark checkpoint. Skips with a message where the Python environment is missing.
mod common;

use common::serve::{client, start, wait_ready, Server};

use base64::Engine as _;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests in every round, whatever its number of clients.
const REQUESTS_PER_ROUND: usize = 32;

/// One streamed answer as its client saw it.
struct Streamed {
    /// From sending the request to its first chunk, and to its last.
    first: Duration,
    last: Duration,
    /// Every chunk's cumulative text.
    texts: Vec<String>,
    /// Tokens reported by the first chunk, and by all chunks.
    first_tokens: usize,
    tokens: usize,
}

impl Streamed {
    /// This stream's own decode rate: tokens after its first chunk per second from its first to its last
    /// chunk; `None` when nothing came after the first chunk.
    fn decode_rate(&self) -> Option<f64> {
        let seconds = (self.last - self.first).as_secs_f64();
        (self.tokens > self.first_tokens && seconds > 0.0).then(|| (self.tokens - self.first_tokens) as f64 / seconds)
    }
}

/// Streams one request from `/worker_generate_stream` (the release's NUL-separated JSON chunks).
fn stream(url: &str, body: &Value) -> Streamed {
    let start = Instant::now();
    let mut response = client().post(format!("{url}/worker_generate_stream")).json(body).send().unwrap();
    let (mut buffer, mut first, mut last, mut texts) = (Vec::new(), None, Duration::ZERO, Vec::new());
    let (mut first_tokens, mut tokens) = (None, 0);
    let mut piece = [0u8; 4096];
    loop {
        let n = response.read(&mut piece).unwrap();
        if n == 0 {
            break;
        }
        buffer.extend_from_slice(&piece[..n]);
        while let Some(end) = buffer.iter().position(|&b| b == 0) {
            let at = start.elapsed();
            let chunk: Vec<u8> = buffer.drain(..=end).take(end).collect();
            let value: Value = serde_json::from_slice(&chunk).unwrap();
            assert_eq!(value["error_code"], 0, "{value}");
            texts.push(value["text"].as_str().unwrap().to_string());
            tokens += value["logprobs"]["content"].as_array().map_or(0, Vec::len);
            first.get_or_insert(at);
            first_tokens.get_or_insert(tokens);
            last = at;
        }
    }
    assert!(buffer.is_empty(), "stream ended mid-chunk");
    Streamed { first: first.unwrap_or_default(), last, texts, first_tokens: first_tokens.unwrap_or(0), tokens }
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `requests` requests from `clients` concurrent clients, request `i` being `bodies[i % bodies.len()]`;
/// returns each request's index and stream, and the round's wall time.
fn round(url: &str, bodies: &[Value], clients: usize, requests: usize) -> (Vec<(usize, Streamed)>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, bodies, next) = (url.to_string(), bodies.to_vec(), next.clone());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests {
                        return done;
                    }
                    done.push((i, stream(&url, &bodies[i % bodies.len()])));
                }
            })
        })
        .collect();
    let results = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    (results, start.elapsed())
}

fn served(worker: &Server) -> u64 {
    let metrics = client().get(format!("{}/metrics", worker.url)).send().unwrap().text().unwrap();
    metrics.lines().find_map(|l| l.strip_prefix("arcana_requests_total ")).unwrap().parse().unwrap()
}

#[test]
fn one_eight_and_thirty_two_clients_through_the_controller_to_two_workers() {
    let Some(dir) = common::cli_fixtures() else { return };
    let controller = start(dir, &["controller"]);
    let workers: Vec<Server> = (0..2)
        .map(|_| start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &controller.url]))
        .collect();
    for w in &workers {
        wait_ready(&w.url);
    }
    common::serve::wait_registered(&controller.url, &["arcana-cli-tiny-v1"]);
    let chat = |q: &str| {
        format!("A chat between a curious human and an artificial intelligence assistant. USER: {q} ASSISTANT:")
    };
    let body = |prompt: String, images: Vec<String>| {
        json!({"model": "arcana-cli-tiny-v1", "prompt": prompt, "images": images, "temperature": 0,
               "max_new_tokens": 32, "logprobs": true})
    };
    let mut bodies: Vec<Value> = ["Hello", "Name three colors.", "Count to five.", "What is a cat?"]
        .iter()
        .map(|q| body(chat(q), Vec::new()))
        .collect();
    let png = std::fs::read(dir.join("images/square.png")).unwrap();
    let image = base64::engine::general_purpose::STANDARD.encode(png);
    bodies.push(body(chat("<image>\nWhat is in this image?"), vec![image]));
    // Each prompt alone on one worker: the answer every stream of it must give.
    let solo: Vec<String> = bodies.iter().map(|b| stream(&workers[0].url, b).texts.last().cloned().unwrap()).collect();

    for clients in [1, 8, 32] {
        let before: Vec<u64> = workers.iter().map(served).collect();
        let (results, elapsed) = round(&controller.url, &bodies, clients, REQUESTS_PER_ROUND);
        assert_eq!(results.len(), REQUESTS_PER_ROUND);
        for (i, streamed) in &results {
            let texts = &streamed.texts;
            assert_eq!(
                texts.last(),
                Some(&solo[i % bodies.len()]),
                "{clients} clients, request {i}: answer differs from its solo run"
            );
            assert!(
                texts.windows(2).all(|w| w[1].starts_with(&w[0])),
                "{clients} clients, request {i}: the cumulative text went back"
            );
            assert!(streamed.tokens > 0, "{clients} clients, request {i}: no token reported");
        }
        let mut first_chunks: Vec<Duration> = results.iter().map(|(_, s)| s.first).collect();
        first_chunks.sort();
        let mut rates: Vec<f64> = results.iter().filter_map(|(_, s)| s.decode_rate()).collect();
        rates.sort_by(f64::total_cmp);
        let per_worker: Vec<u64> = workers.iter().zip(&before).map(|(w, b)| served(w) - b).collect();
        println!(
            "{clients:>2} clients, {REQUESTS_PER_ROUND} requests: {:.2} requests/s ({:.1} s), time to first chunk \
             p50 {:.2} s p99 {:.2} s, decode tokens/s per stream median {:.1} slowest {:.1} ({} streams); \
             requests per worker {per_worker:?}",
            REQUESTS_PER_ROUND as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            percentile(&first_chunks, 0.5).as_secs_f64(),
            percentile(&first_chunks, 0.99).as_secs_f64(),
            if rates.is_empty() { f64::NAN } else { percentile(&rates, 0.5) },
            rates.first().copied().unwrap_or(f64::NAN),
            rates.len(),
        );
        if clients == 32 {
            assert!(per_worker.iter().all(|&n| n >= 8), "shortest_queue should spread the load: {per_worker:?}");
        }
    }
    println!(
        "peak RSS MiB: controller {:.0}, workers {:.0} and {:.0}",
        controller.peak_rss_mib(),
        workers[0].peak_rss_mib(),
        workers[1].peak_rss_mib(),
    );
}
