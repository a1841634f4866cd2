//! A worker and controller (`arcana-serve` processes on loopback, the cli-tiny checkpoint) against
//! careless and hostile clients: a queued request whose client leaves never runs, a whole (not
//! streamed) answer whose client leaves is cancelled, a long answer whose client never reads is cut
//! by the idle timeout, an API key guards the worker and travels between the servers, and a request
//! from a foreign Host name is refused. Skips where the Python environment that makes the checkpoint
//! is missing.
mod common;

use common::serve::{client, start, wait_ready, wait_until};

use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn metric(url: &str, name: &str) -> u64 {
    let text = client().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn queue_length(url: &str) -> i64 {
    let status: Value = client().post(format!("{url}/worker_get_status")).send().unwrap().json().unwrap();
    status["queue_length"].as_i64().unwrap()
}

fn text_request(max_new_tokens: u64) -> Value {
    json!({"model": "arcana-cli-tiny-v1", "prompt": "USER: Tell me a long story. ASSISTANT:",
           "temperature": 0, "max_new_tokens": max_new_tokens})
}

#[test]
fn a_queued_request_whose_client_leaves_never_runs() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(
        dir,
        &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register", "--limit-model-concurrency", "1"],
    );
    wait_ready(&worker.url);
    let url = worker.url.clone();
    // One long answer holds the only slot.
    let busy = std::thread::spawn({
        let url = url.clone();
        move || client().post(format!("{url}/worker_generate_stream")).json(&text_request(400)).send()?.bytes()
    });
    wait_until("the first answer to start", 30, || queue_length(&url) == 1);
    // A second client gives up while its request waits.
    let impatient = reqwest::blocking::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let gave_up = impatient.post(format!("{url}/worker_generate_stream")).json(&text_request(400)).send();
    assert!(gave_up.is_err() || gave_up.unwrap().bytes().is_err(), "the second request was served at once");
    wait_until("the abandoned request to leave the queue", 10, || metric(&url, "arcana_requests_abandoned_total") == 1);
    busy.join().unwrap().unwrap();
    wait_until("the queue to empty", 30, || queue_length(&url) == 0);
    let first_tokens = metric(&url, "arcana_time_to_first_token_seconds_count");
    assert_eq!(first_tokens, 1, "the abandoned request was run");
}

#[test]
fn a_whole_answer_whose_client_leaves_is_cancelled() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"]);
    wait_ready(&worker.url);
    let url = worker.url.clone();
    let body = json!({"model": "arcana-cli-tiny-v1", "messages": [{"role": "user", "content": "Tell me a story."}],
                      "temperature": 0, "max_tokens": 100000});
    let impatient = reqwest::blocking::Client::builder().timeout(Duration::from_millis(1500)).build().unwrap();
    let started = Instant::now();
    assert!(impatient.post(format!("{url}/v1/chat/completions")).json(&body).send().is_err());
    wait_until("the abandoned answer to stop", 10, || queue_length(&url) == 0);
    // Tokens stop being counted once the answer is cancelled: the count no longer grows.
    let tokens = metric(&url, "arcana_generated_tokens_total");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(metric(&url, "arcana_generated_tokens_total"), tokens, "the answer ran on");
    assert!(started.elapsed() < Duration::from_secs(12));
}

#[test]
fn an_api_key_guards_the_servers_and_travels_between_them() {
    let Some(dir) = common::cli_fixtures() else { return };
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), "k3y\n").unwrap();
    let key_path = key_file.path().to_str().unwrap();
    let controller = start(dir, &["controller", "--api-key-file", key_path]);
    let worker = start(
        dir,
        &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &controller.url, "--api-key", "k3y"],
    );
    wait_ready(&worker.url);
    let models = |key: Option<&str>| {
        let request = client().post(format!("{}/list_models", controller.url));
        let request = if let Some(key) = key { request.bearer_auth(key) } else { request };
        request.send().unwrap()
    };
    assert_eq!(models(None).status(), 401);
    // The worker registered with the key; the controller calls it with the key.
    wait_until("the registration", 20, || {
        models(Some("k3y")).json::<Value>().is_ok_and(|m| m == json!({"models": ["arcana-cli-tiny-v1"]}))
    });
    let reply = client()
        .post(format!("{}/v1/chat/completions", controller.url))
        .bearer_auth("k3y")
        .json(&json!({"model": "arcana-cli-tiny-v1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
        .send()
        .unwrap();
    assert_eq!(reply.status(), 200, "{}", reply.text().unwrap());
    for path in ["/worker_get_status", "/v1/chat/completions", "/worker_generate_stream"] {
        let r = client().post(format!("{}{path}", worker.url)).json(&json!({})).send().unwrap();
        assert_eq!(r.status(), 401, "{path} answered without the key");
    }
    assert!(client().get(format!("{}/health", worker.url)).send().unwrap().status().is_success());
}

#[test]
fn requests_naming_a_foreign_host_are_refused() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"]);
    wait_ready(&worker.url);
    let r = client()
        .post(format!("{}/v1/chat/completions", worker.url))
        .header("host", "attacker.example")
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 421);
    let worker_named = start(
        dir,
        &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register", "--allowed-host", "workers.internal"],
    );
    wait_ready(&worker_named.url);
    let r = client()
        .post(format!("{}/v1/chat/completions", worker_named.url))
        .header("host", "workers.internal")
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The release's chunks repeat the whole text so far: a 1000-token answer is megabytes, which the
/// kernel's own send buffer (grown up to tcp_wmem's 4 MiB) would take whole for a client that never
/// reads, so the idle timeout never saw it stall and the answer ran to its end, holding the slot.
#[test]
fn a_long_answer_nobody_reads_is_cancelled_after_the_idle_timeout() {
    let Some(dir) = common::cli_fixtures() else { return };
    let max_new_tokens = 1000;
    let worker = start(
        dir,
        &[
            "worker",
            "--model-path",
            "arcana-cli-tiny-v1",
            "--no-register",
            "--limit-model-concurrency",
            "1",
            "--idle-timeout",
            "0.5",
        ],
    );
    wait_ready(&worker.url);
    let url = worker.url.clone();
    let body = serde_json::to_vec(&text_request(max_new_tokens)).unwrap();
    let head = format!(
        "POST /worker_generate_stream HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut never_reads = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    std::io::Write::write_all(&mut never_reads, &[head.as_bytes(), &body].concat()).unwrap();
    wait_until("the answer to start", 30, || metric(&url, "arcana_generated_tokens_total") > 0);
    wait_until("the answer to end", 60, || queue_length(&url) == 0);
    let generated = metric(&url, "arcana_generated_tokens_total");
    assert!(generated < max_new_tokens, "all {generated} tokens were generated for a client that never read");
    // The slot is free again: a request that reads its answer gets it.
    let reply = client().post(format!("{url}/worker_generate_stream")).json(&text_request(4)).send().unwrap();
    assert!(reply.bytes().unwrap().ends_with(&[0]));
    drop(never_reads);
}
