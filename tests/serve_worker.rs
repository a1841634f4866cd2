//! `arcana-serve worker` and `controller` as separate processes on loopback, on the cli-tiny checkpoint
//! made by `python parity/cli_fixtures.py` (skips with a message where the Python environment is
//! missing): a greedy request through the controller answers the CLI reference's text, bad requests get
//! error chunks naming the problem, a full context gets the release's reply, requests past the
//! concurrency limit wait in the queue, a client that leaves frees its slot, and a killed worker ends
//! the client's stream with an error chunk.
mod common;

use common::serve::{client, start, start_on, wait_ready, wait_until};

use arcana::serve::protocol::{ChunkSplitter, StreamChunk};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn chunks(bytes: &[u8]) -> Vec<StreamChunk> {
    let mut splitter = ChunkSplitter::default();
    let parts = splitter.push(bytes);
    assert!(
        splitter.remainder().is_empty(),
        "stream ended mid-chunk: {:?}",
        String::from_utf8_lossy(splitter.remainder())
    );
    parts.iter().map(|c| serde_json::from_slice(c).unwrap()).collect()
}

fn generate(url: &str, body: &Value) -> Vec<StreamChunk> {
    let r = client().post(format!("{url}/worker_generate_stream")).json(body).send().unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    chunks(&r.bytes().unwrap())
}

fn expected_first_turn(dir: &Path, case: &str) -> Value {
    let text = std::fs::read_to_string(dir.join("expected").join(format!("{case}.json"))).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["turns"][0].clone()
}

fn base64_file(path: &Path) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

fn square_request(dir: &Path, max_new_tokens: u64) -> Value {
    let turn = expected_first_turn(dir, "v1-square-greedy");
    json!({
        "model": "arcana-cli-tiny-v1",
        "prompt": turn["prompt"],
        "images": [base64_file(&dir.join("images/square.png"))],
        "temperature": 0,
        "max_new_tokens": max_new_tokens,
    })
}

fn status(url: &str) -> Value {
    client().post(format!("{url}/worker_get_status")).send().unwrap().json().unwrap()
}

#[test]
fn a_greedy_request_through_the_controller_answers_like_the_cli() {
    let Some(dir) = common::cli_fixtures() else { return };
    let controller = start(dir, &["controller"]);
    let worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &controller.url]);
    wait_ready(&worker.url);
    // Registered on load.
    common::serve::wait_registered(&controller.url, &["arcana-cli-tiny-v1"]);

    let turn = expected_first_turn(dir, "v1-square-greedy");
    let prompt = turn["prompt"].as_str().unwrap();
    let got = generate(&controller.url, &square_request(dir, 24));
    assert!(got.len() > 1, "streamed in pieces: {got:?}");
    assert!(got.iter().all(|c| c.error_code == 0 && c.text.starts_with(prompt)), "{got:?}");
    assert!(got.iter().all(|c| c.logprobs.is_none()), "no log-probabilities unless asked: {got:?}");
    let answer = &got.last().unwrap().text[prompt.len()..];
    assert_eq!(answer, turn["text"].as_str().unwrap());

    // The same straight to the worker; the queue is empty afterwards.
    let direct = generate(&worker.url, &square_request(dir, 24));
    assert_eq!(direct.last(), got.last());
    assert_eq!(status(&worker.url)["queue_length"], 0);
    let metrics = client().get(format!("{}/metrics", worker.url)).send().unwrap().text().unwrap();
    assert!(metrics.contains("arcana_requests_total 2"), "{metrics}");
    assert!(metrics.contains("arcana_generated_tokens_total 48"), "{metrics}");
}

#[test]
fn a_schema_shapes_the_release_stream_and_each_chunk_reports_its_tokens_log_probabilities() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"]);
    wait_ready(&worker.url);
    let prompt = expected_first_turn(dir, "v1-square-greedy")["prompt"].as_str().unwrap().to_string();
    let mut request = square_request(dir, 64);
    request["json_schema"] = json!({"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["colour", "count"],
        "additionalProperties": false});
    request["logprobs"] = json!(2);
    let got = generate(&worker.url, &request);
    assert!(got.iter().all(|c| c.error_code == 0 && c.logprobs.is_some()), "{got:?}");
    let answer = &got.last().unwrap().text[prompt.len()..];
    let value: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{answer:?} is not JSON: {e}"));
    assert!(["red", "green", "blue"].contains(&value["colour"].as_str().unwrap()), "{value}");
    assert!((0..=9).contains(&value["count"].as_i64().unwrap()), "{value}");
    // Every token once, in order, across the chunks: their bytes spell the answer (an EOS adds none).
    let tokens: Vec<Value> =
        got.iter().flat_map(|c| c.logprobs.as_ref().unwrap()["content"].as_array().unwrap().clone()).collect();
    let spelled: Vec<u8> = tokens
        .iter()
        .filter(|t| t["token"] != "</s>")
        .flat_map(|t| t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8))
        .collect();
    assert_eq!(String::from_utf8(spelled).unwrap(), answer);
    for token in &tokens {
        let (logprob, top) = (token["logprob"].as_f64().unwrap(), token["top_logprobs"].as_array().unwrap());
        assert!(logprob <= 0.0 && top.len() == 2, "{token}");
        // Greedy takes the most likely token the schema allows, and the mask leaves only those.
        assert_eq!(top[0]["logprob"].as_f64().unwrap(), logprob, "{token}");
        assert_eq!(top[0]["token"], token["token"], "{token}");
    }
    // The same request on the OpenAI API reports the same numbers.
    let openai = client()
        .post(format!("{}/v1/chat/completions", worker.url))
        .json(&json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", request["images"][0].as_str().unwrap())}}]}],
            "temperature": 0, "max_tokens": 64, "logprobs": true, "top_logprobs": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": request["json_schema"]}}}))
        .send()
        .unwrap();
    assert!(openai.status().is_success(), "{}", openai.status());
    let openai: Value = openai.json().unwrap();
    let choice = &openai["choices"][0];
    assert_eq!(choice["message"]["content"], answer);
    assert_eq!(choice["logprobs"]["content"].as_array().unwrap(), &tokens);
    // Both answers were constrained in every decoding step; the constraint took a part of each step.
    let metrics = client().get(format!("{}/metrics", worker.url)).send().unwrap().text().unwrap();
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{metrics}"));
        line[name.len() + 1..].parse().unwrap()
    };
    let decoded = value("arcana_decode_tokens_total");
    assert_eq!(decoded, 2.0 * (tokens.len() - 1) as f64, "the first token of each is the prefill's");
    assert_eq!(value("arcana_constrained_tokens_total"), decoded);
    assert_eq!(value("arcana_decode_steps_total"), decoded, "alone in the batch: one token per step");
    let (constraint, steps) = (value("arcana_constraint_seconds_total"), value("arcana_decode_step_seconds_total"));
    assert!(constraint > 0.0 && constraint < steps, "{metrics}");
}

#[test]
fn a_worker_with_its_decoder_split_over_two_placements_answers_like_the_cli() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(
        dir,
        &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register", "--device-map", "cpu=0-0,cpu=1-1"],
    );
    wait_ready(&worker.url);
    let turn = expected_first_turn(dir, "v1-square-greedy");
    let got = generate(&worker.url, &square_request(dir, 24));
    let last = got.last().unwrap();
    assert_eq!(last.error_code, 0, "{got:?}");
    assert_eq!(&last.text[turn["prompt"].as_str().unwrap().len()..], turn["text"].as_str().unwrap());
}

#[test]
fn bad_requests_get_error_chunks_that_name_the_problem() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"]);
    wait_ready(&worker.url);
    let mut request = square_request(dir, 4);
    let cases: Vec<(Value, &str)> = vec![
        (json!(["%%% not base64"]), "image 1: not valid base64"),
        (json!([base64_file(&dir.join("expected/v1-square-greedy.json"))]), "image 1"),
        (json!([]), "Number of images does not match number of <image> tokens"),
        (json!("one"), "`images` must be a list"),
    ];
    for (images, message) in cases {
        request["images"] = images;
        let got = generate(&worker.url, &request);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].error_code, 1, "{got:?}");
        assert!(got[0].text.contains(message), "expected `{message}` in {:?}", got[0].text);
    }
    let no_prompt = generate(&worker.url, &json!({"images": []}));
    assert!(no_prompt[0].text.contains("`prompt`"), "{no_prompt:?}");
    // Malformed JSON is an HTTP error with a JSON body.
    let r = client()
        .post(format!("{}/worker_generate_stream", worker.url))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"].is_string());
    // A request without `stop` and with the release's defaults works (the release raised a TypeError).
    let ok = generate(&worker.url, &json!({"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 3}));
    assert_eq!(ok.last().unwrap().error_code, 0, "{ok:?}");
}

#[test]
fn requests_past_the_image_and_stop_limits_get_error_chunks_naming_the_limit() {
    let Some(dir) = common::cli_fixtures() else { return };
    let args = ["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"];
    let worker = start(dir, &[&args[..], &["--max-images-per-request", "2", "--max-stop-length", "8"]].concat());
    wait_ready(&worker.url);
    // Three images that are not even base64: refused by count before any is read.
    let images = json!({"prompt": "USER: <image><image><image> hi ASSISTANT:", "images": ["%%%", "%%%", "%%%"]});
    let got = generate(&worker.url, &images);
    assert_eq!((got.len(), got[0].error_code), (1, 1), "{got:?}");
    assert!(got[0].text.contains("3 images") && got[0].text.contains("limit is 2 images per request"), "{got:?}");
    let stop = json!({"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 3, "stop": "123456789"});
    let got = generate(&worker.url, &stop);
    assert_eq!((got.len(), got[0].error_code), (1, 1), "{got:?}");
    assert!(got[0].text.contains("9 bytes") && got[0].text.contains("limit is 8 bytes"), "{got:?}");
    for (logprobs, message) in [(json!(21), "limit is 20 (--max-top-logprobs)"), (json!(-1), "`logprobs` must be")] {
        let got = generate(&worker.url, &json!({"prompt": "USER: hi ASSISTANT:", "logprobs": logprobs}));
        assert_eq!((got.len(), got[0].error_code), (1, 1), "{got:?}");
        assert!(got[0].text.contains(message), "expected `{message}` in {got:?}");
    }
    // The worker keeps serving.
    let ok = generate(&worker.url, &json!({"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 3, "stop": "12345678"}));
    assert_eq!(ok.last().unwrap().error_code, 0, "{ok:?}");
}

#[test]
fn a_prompt_that_fills_the_context_gets_the_release_reply() {
    let Some(dir) = common::cli_fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    common::copy_with_context(&dir.join("arcana-cli-tiny-v1"), &tmp.path().join("arcana-cli-tiny-v1"), 64);
    let worker = start(tmp.path(), &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"]);
    wait_ready(&worker.url);
    let request = square_request(dir, 24);
    let got = generate(&worker.url, &request);
    let prompt = request["prompt"].as_str().unwrap();
    assert_eq!(
        got,
        vec![StreamChunk::text(format!("{prompt}Exceeds max token length. Please start a new conversation, thanks."))]
    );
}

#[test]
fn requests_past_the_limit_queue_and_a_leaving_client_frees_its_slot() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(
        dir,
        &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register", "--limit-model-concurrency", "1"],
    );
    wait_ready(&worker.url);
    let url = worker.url.clone();
    // Three at once with one slot: all complete, and the status counted them while they waited.
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let (url, body) = (url.clone(), square_request(dir, 200));
            std::thread::spawn(move || generate(&url, &body))
        })
        .collect();
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && most < 3 {
        most = most.max(status(&url)["queue_length"].as_i64().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    let answers: Vec<_> = requests.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(most >= 2, "queue_length never showed the waiting requests (max {most})");
    for a in &answers {
        assert_eq!(a.last().unwrap().error_code, 0);
        assert_eq!(a.last(), answers[0].last(), "greedy answers differ");
    }
    assert_eq!(status(&url)["queue_length"], 0);

    // A client that reads one chunk and leaves: the slot is free again soon (the answer is cancelled
    // before its next token), so the next request is served right away.
    let mut response =
        client().post(format!("{url}/worker_generate_stream")).json(&square_request(dir, 1000)).send().unwrap();
    let mut first = [0u8; 64];
    let _ = std::io::Read::read(&mut response, &mut first).unwrap();
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&url)["queue_length"] != 0 {
        assert!(Instant::now() < deadline, "the slot was not freed after the client left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = client().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    let generated: u64 =
        metrics.lines().find_map(|l| l.strip_prefix("arcana_generated_tokens_total ")).unwrap().parse().unwrap();
    assert!(generated < 3 * 200 + 1000, "the abandoned answer ran on: {generated} tokens");
}

#[test]
fn a_worker_killed_mid_stream_ends_the_stream_with_an_error() {
    let Some(dir) = common::cli_fixtures() else { return };
    let controller = start(dir, &["controller", "--stream-timeout", "30"]);
    let mut worker =
        start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &controller.url]);
    wait_ready(&worker.url);
    common::serve::wait_registered(&controller.url, &["arcana-cli-tiny-v1"]);
    let url = controller.url.clone();
    let body = square_request(dir, 1000);
    let reader = std::thread::spawn(move || {
        let r = client().post(format!("{url}/worker_generate_stream")).json(&body).send().unwrap();
        chunks(&r.bytes().unwrap())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let _ = worker.child.kill();
    let got = reader.join().unwrap();
    assert_eq!(got.last().unwrap().error_code, 3, "{:?}", got.last());
    let last = &got.last().unwrap().text;
    assert!(last.contains("arcana-cli-tiny-v1") && !last.contains(&worker.url), "{last:?}");
    // A new request for the model, while the dead worker is still registered, fails fast with error 3.
    let again = generate(&controller.url, &square_request(dir, 4));
    assert_eq!(again.last().unwrap().error_code, 3);
}

#[test]
fn sigterm_lets_an_answer_in_flight_finish_then_exits() {
    let Some(dir) = common::cli_fixtures() else { return };
    let mut worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"]);
    wait_ready(&worker.url);
    let (url, body) = (worker.url.clone(), square_request(dir, 64));
    let reader = std::thread::spawn(move || {
        let r = client().post(format!("{url}/worker_generate_stream")).json(&body).send().unwrap();
        chunks(&r.bytes().unwrap())
    });
    // Once the answer has started, ask the worker to stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&worker.url)["queue_length"] == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: plain kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(worker.child.id() as i32, libc::SIGTERM) }, 0);
    let got = reader.join().unwrap();
    assert!(got.iter().all(|c| c.error_code == 0), "{got:?}");
    let expected_tokens = 64;
    assert!(got.len() >= expected_tokens / 2, "the answer was cut short: {} chunks", got.len());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "the worker did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(client().get(format!("{}/health", worker.url)).send().is_err(), "still accepting connections");
}

fn models(controller: &str) -> Value {
    client().post(format!("{controller}/list_models")).send().and_then(|r| r.json()).unwrap_or(Value::Null)
}

#[test]
fn workers_register_again_with_a_restarted_controller() {
    let Some(dir) = common::cli_fixtures() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let controller = start_on(dir, &["controller"], port);
    let url = controller.url.clone();
    let worker = start(
        dir,
        &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &url, "--heart-beat-interval", "0.5"],
    );
    wait_ready(&worker.url);
    wait_until("the first registration", 10, || models(&url) == json!({"models": ["arcana-cli-tiny-v1"]}));
    drop(controller);
    // A new controller on the same address knows no worker until the next heart beat says exist=false.
    let _restarted = start_on(dir, &["controller"], port);
    wait_until("the worker to register again", 10, || models(&url) == json!({"models": ["arcana-cli-tiny-v1"]}));
    let got = generate(&url, &square_request(dir, 4));
    assert_eq!(got.last().unwrap().error_code, 0, "{got:?}");
}

#[test]
fn a_dead_worker_expires_and_requests_go_to_the_other() {
    let Some(dir) = common::cli_fixtures() else { return };
    let controller = start(dir, &["controller", "--heart-beat-expiration", "1"]);
    let url = controller.url.clone();
    let args = [
        "worker",
        "--model-path",
        "arcana-cli-tiny-v1",
        "--controller-address",
        url.as_str(),
        "--heart-beat-interval",
        "0.3",
    ];
    let mut doomed = start(dir, &args);
    let survivor = start(dir, &args);
    wait_ready(&doomed.url);
    wait_ready(&survivor.url);
    let _ = doomed.child.kill();
    let _ = doomed.child.wait();
    // Within two expiry periods the dead worker is gone: every request is answered by the survivor.
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..3 {
        let address: Value = client()
            .post(format!("{url}/get_worker_address"))
            .json(&json!({"model": "arcana-cli-tiny-v1"}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(address["address"], survivor.url.as_str());
        let got = generate(&url, &square_request(dir, 4));
        assert_eq!(got.last().unwrap().error_code, 0, "{got:?}");
    }
}

#[test]
fn a_worker_stopped_with_sigterm_leaves_the_controller_at_once() {
    let Some(dir) = common::cli_fixtures() else { return };
    let controller = start(dir, &["controller"]);
    let url = controller.url.clone();
    let mut worker =
        start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", url.as_str()]);
    wait_ready(&worker.url);
    wait_until("the registration", 10, || models(&url) == json!({"models": ["arcana-cli-tiny-v1"]}));
    // SAFETY: plain kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(worker.child.id() as i32, libc::SIGTERM) }, 0);
    // Well before the 30 s expiry.
    wait_until("the worker to unregister", 10, || models(&url) == json!({"models": []}));
    let _ = worker.child.wait();
}

#[test]
fn a_worker_reuses_a_repeated_image_and_prompt_beginning_and_answers_as_without() {
    let Some(dir) = common::cli_fixtures() else { return };
    let model = ["worker", "--no-register", "--model-path", "arcana-cli-tiny-v1", "--prefill-chunk", "8"];
    let fresh = start(dir, &model);
    let reusing = start(dir, &[&model[..], &["--reuse-cache-bytes", "1073741824"]].concat());
    wait_ready(&fresh.url);
    wait_ready(&reusing.url);
    let image = format!("data:image/png;base64,{}", base64_file(&dir.join("images/square.png")));
    let ask = |url: &str, question: &str| -> Value {
        let body = json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]}],
            "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 3});
        let r = client().post(format!("{url}/v1/chat/completions")).json(&body).send().unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.json::<Value>().unwrap()
    };
    let cached = |reply: &Value| reply["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    // The same image with two questions, then the first again: equal to the bit with the same chunks.
    for (i, question) in
        ["What is in this image?", "Describe the colours.", "What is in this image?"].iter().enumerate()
    {
        let (got, want) = (ask(&reusing.url, question), ask(&fresh.url, question));
        assert_eq!(got["choices"][0], want["choices"][0], "{question}");
        // OpenAI's count of prompt tokens served from a cache: whole chunks of 8 after the first request.
        assert_eq!(cached(&want), 0);
        let reused = cached(&got);
        assert!(if i == 0 { reused == 0 } else { reused > 0 && reused % 8 == 0 }, "request {i}: {reused} cached");
        assert!(reused < got["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    let metrics = client().get(format!("{}/metrics", reusing.url)).send().unwrap().text().unwrap();
    let value = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{metrics}"));
        line[name.len() + 1..].parse().unwrap()
    };
    assert_eq!((value("arcana_image_cache_hits_total"), value("arcana_image_cache_misses_total")), (2, 1));
    assert_eq!((value("arcana_prefix_cache_hits_total"), value("arcana_prefix_cache_misses_total")), (2, 1));
    assert!(value("arcana_prefix_cache_reused_positions_total") > 0, "{metrics}");
    let (bytes, budget) = (value("arcana_reuse_cache_bytes"), value("arcana_reuse_cache_budget_bytes"));
    assert!(bytes > 0 && bytes <= budget && budget == 1 << 30, "{metrics}");
}
