//! The controller over real HTTP (reqwest client, axum servers on loopback): registration, heart beats,
//! expiry, both dispatch rules, the proxied NUL-delimited stream and its failures, bad requests; and
//! the `arcana-serve controller` binary answering on a port it picked. Workers here are small axum
//! servers that speak the release's worker protocol with canned replies.
use arcana::serve::controller::{Controller, DispatchMethod};
use arcana::serve::controller_app;
use arcana::serve::http;
use arcana::serve::protocol::{ChunkSplitter, StreamChunk, WorkerStatus};
use axum::body::Body;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::time::Duration;

async fn spawn(app: Router) -> String {
    let (listener, addr) = http::bind("127.0.0.1", 0).await.unwrap();
    tokio::spawn(http::serve(listener, app));
    format!("http://{addr}")
}

async fn spawn_controller(controller: Controller) -> String {
    spawn(controller_app(controller)).await
}

/// A worker that streams `chunks` (cumulative texts), then, if `die`, breaks the connection.
async fn spawn_worker(model: &str, chunks: Vec<&'static str>, die: bool) -> String {
    let status = WorkerStatus { model_names: vec![model.to_string()], speed: 1.0, queue_length: 0 };
    let app = Router::new().route("/worker_get_status", post(move || async move { Json(status.clone()) })).route(
        "/worker_generate_stream",
        post(move || async move {
            // Chunks a little apart, as tokens come; then either the end or a broken connection.
            let steps: Vec<Option<&'static str>> = chunks.iter().map(|t| Some(*t)).chain(die.then_some(None)).collect();
            let body = futures_util::stream::unfold(steps.into_iter(), |mut steps| async move {
                let step = steps.next()?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let item = match step {
                    Some(text) => Ok(StreamChunk { text: text.to_string(), error_code: 0 }.to_wire()),
                    None => Err(std::io::Error::other("worker died")),
                };
                Some((item, steps))
            });
            Body::from_stream(body)
        }),
    );
    spawn(app).await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_json(url: &str, body: Value) -> Value {
    let r = client().post(url).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

async fn stream(controller: &str, body: Value) -> Vec<StreamChunk> {
    let bytes = client()
        .post(format!("{controller}/worker_generate_stream"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut splitter = ChunkSplitter::default();
    let chunks = splitter.push(&bytes);
    assert!(splitter.remainder().is_empty(), "stream ended mid-chunk");
    chunks.iter().map(|c| serde_json::from_slice(c).unwrap()).collect()
}

fn register_body(worker: &str, model: &str, queue_length: i64) -> Value {
    json!({"worker_name": worker, "check_heart_beat": true,
           "worker_status": {"model_names": [model], "speed": 1, "queue_length": queue_length}})
}

#[tokio::test]
async fn workers_register_beat_and_expire() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10))
        .with_expiration(Duration::from_millis(300));
    let url = spawn_controller(c.clone()).await;
    assert_eq!(post_json(&format!("{url}/list_models"), json!({})).await, json!({"models": []}));
    // Without a status the controller asks the worker for it.
    let worker = spawn_worker("tiny", vec![], false).await;
    post_json(&format!("{url}/register_worker"), json!({"worker_name": worker, "check_heart_beat": true})).await;
    post_json(&format!("{url}/register_worker"), register_body("http://127.0.0.1:9", "other", 0)).await;
    assert_eq!(post_json(&format!("{url}/list_models"), json!({})).await, json!({"models": ["other", "tiny"]}));
    let beat = post_json(&format!("{url}/receive_heart_beat"), json!({"worker_name": worker, "queue_length": 3})).await;
    assert_eq!(beat, json!({"exist": true}));
    let unknown =
        post_json(&format!("{url}/receive_heart_beat"), json!({"worker_name": "http://nowhere", "queue_length": 0}))
            .await;
    assert_eq!(unknown, json!({"exist": false}));
    // Past the expiry without a beat, both are dropped; a beat then says "register again".
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.remove_expired();
    assert_eq!(post_json(&format!("{url}/list_models"), json!({})).await, json!({"models": []}));
    let beat = post_json(&format!("{url}/receive_heart_beat"), json!({"worker_name": worker, "queue_length": 0})).await;
    assert_eq!(beat, json!({"exist": false}));
}

#[tokio::test]
async fn shortest_queue_picks_the_least_loaded_and_counts_the_request() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10));
    let url = spawn_controller(c).await;
    post_json(&format!("{url}/register_worker"), register_body("http://a", "m", 2)).await;
    post_json(&format!("{url}/register_worker"), register_body("http://b", "m", 0)).await;
    let mut picks = Vec::new();
    for _ in 0..4 {
        picks.push(
            post_json(&format!("{url}/get_worker_address"), json!({"model": "m"})).await["address"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // b (0) -> b (1) -> a (2, first of the tie) -> b (2 vs 3)
    assert_eq!(picks, ["http://b", "http://b", "http://a", "http://b"]);
    assert_eq!(post_json(&format!("{url}/get_worker_address"), json!({"model": "none"})).await, json!({"address": ""}));
}

#[tokio::test]
async fn lottery_draws_only_among_the_models_workers_by_speed() {
    let c = Controller::new(DispatchMethod::Lottery, Duration::from_secs(10));
    let url = spawn_controller(c).await;
    post_json(&format!("{url}/register_worker"), register_body("http://a", "m", 0)).await;
    post_json(&format!("{url}/register_worker"), register_body("http://b", "m", 0)).await;
    post_json(&format!("{url}/register_worker"), register_body("http://c", "other", 0)).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(
            post_json(&format!("{url}/get_worker_address"), json!({"model": "m"})).await["address"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["http://a", "http://b"]);
}

#[tokio::test]
async fn streams_are_proxied_and_failures_end_with_an_error_chunk() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(2));
    let url = spawn_controller(c).await;
    let good = spawn_worker("good", vec!["Hi", "Hi there"], false).await;
    post_json(&format!("{url}/register_worker"), register_body(&good, "good", 0)).await;
    let chunks = stream(&url, json!({"model": "good", "prompt": "x"})).await;
    assert_eq!(chunks.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), ["Hi", "Hi there"]);
    assert!(chunks.iter().all(|c| c.error_code == 0));

    // No worker: one chunk, error 2, naming the model (the release sends a second, error-3 chunk).
    let chunks = stream(&url, json!({"model": "absent"})).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].error_code, 2);
    assert!(chunks[0].text.contains("absent"), "{:?}", chunks[0]);

    // A registered worker that does not answer: error 3 naming its address.
    post_json(&format!("{url}/register_worker"), register_body("http://127.0.0.1:9", "gone", 0)).await;
    let chunks = stream(&url, json!({"model": "gone"})).await;
    assert_eq!((chunks.len(), chunks[0].error_code), (1, 3));
    assert!(chunks[0].text.contains("http://127.0.0.1:9"), "{:?}", chunks[0]);

    // A worker that dies mid-stream: what it sent, then error 3, and the stream ends.
    let dying = spawn_worker("dying", vec!["partial"], true).await;
    post_json(&format!("{url}/register_worker"), register_body(&dying, "dying", 0)).await;
    let chunks =
        tokio::time::timeout(Duration::from_secs(10), stream(&url, json!({"model": "dying"}))).await.expect("no hang");
    assert_eq!(chunks.first().map(|c| c.text.as_str()), Some("partial"));
    assert_eq!(chunks.last().unwrap().error_code, 3, "{chunks:?}");
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let url = spawn_controller(Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10))).await;
    let r = client()
        .post(format!("{url}/get_worker_address"))
        .header("content-type", "application/json")
        .body("{bad")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("JSON"));
    let r = client().post(format!("{url}/get_worker_address")).json(&json!({"modle": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("model"));
    let big = vec![b' '; http::MAX_BODY_BYTES + 1];
    let r = client()
        .post(format!("{url}/get_worker_address"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = client().post(format!("{url}/no_such_thing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn the_binary_serves_on_the_port_it_reports() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_arcana-serve"))
        .args(["controller", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let models = runtime.block_on(post_json(&format!("{url}/list_models"), json!({})));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(models, json!({"models": []}));
}
