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
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

async fn spawn(app: Router) -> String {
    spawn_stoppable(app).await.0
}

/// A server and the task serving it: aborting the task closes its port.
async fn spawn_stoppable(app: Router) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let (listener, addr) = http::bind("127.0.0.1", 0).await.unwrap();
    let task = tokio::spawn(http::serve(listener, app));
    (format!("http://{addr}"), task)
}

async fn spawn_controller(controller: Controller) -> String {
    spawn(controller_app(controller)).await
}

/// A worker that streams `chunks` (cumulative texts), then, if `die`, breaks the connection.
async fn spawn_worker(model: &str, chunks: Vec<&'static str>, die: bool) -> String {
    spawn(fake_worker(model, chunks, die)).await
}

fn fake_worker(model: &str, chunks: Vec<&'static str>, die: bool) -> Router {
    let status = WorkerStatus { model_names: vec![model.to_string()], speed: 1.0, queue_length: 0 };
    Router::new().route("/worker_get_status", post(move || async move { Json(status.clone()) })).route(
        "/worker_generate_stream",
        post(move || async move {
            // Chunks a little apart, as tokens come; then either the end or a broken connection.
            let steps: Vec<Option<&'static str>> = chunks.iter().map(|t| Some(*t)).chain(die.then_some(None)).collect();
            let body = futures_util::stream::unfold(steps.into_iter(), |mut steps| async move {
                let step = steps.next()?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let item = match step {
                    Some(text) => Ok(StreamChunk::text(text).to_wire()),
                    None => Err(std::io::Error::other("worker died")),
                };
                Some((item, steps))
            });
            Body::from_stream(body)
        }),
    )
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
    let other = spawn_worker("other", vec![], false).await;
    post_json(&format!("{url}/register_worker"), register_body(&other, "other", 0)).await;
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
    let url = spawn_controller(c.clone()).await;
    let a = spawn_worker("m", vec![], false).await;
    let b = spawn_worker("m", vec![], false).await;
    post_json(&format!("{url}/register_worker"), register_body(&a, "m", 2)).await;
    post_json(&format!("{url}/register_worker"), register_body(&b, "m", 0)).await;
    // The controller takes the queue lengths the workers report, then their heart beats'.
    assert!(c.heart_beat(&a, 2));
    let mut picks = Vec::new();
    for _ in 0..4 {
        picks.push(
            post_json(&format!("{url}/get_worker_address"), json!({"model": "m"})).await["address"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // b (0) -> b (1) -> the tie at 2 goes to the first worker in address order -> then the other one.
    let (first, second) = if a < b { (a.clone(), b.clone()) } else { (b.clone(), a.clone()) };
    assert_eq!(picks, [b.clone(), b.clone(), first, second]);
    assert_eq!(post_json(&format!("{url}/get_worker_address"), json!({"model": "none"})).await, json!({"address": ""}));
}

#[tokio::test]
async fn lottery_draws_only_among_the_models_workers_by_speed() {
    let c = Controller::new(DispatchMethod::Lottery, Duration::from_secs(10));
    let url = spawn_controller(c).await;
    let a = spawn_worker("m", vec![], false).await;
    let b = spawn_worker("m", vec![], false).await;
    let other = spawn_worker("other", vec![], false).await;
    post_json(&format!("{url}/register_worker"), register_body(&a, "m", 0)).await;
    post_json(&format!("{url}/register_worker"), register_body(&b, "m", 0)).await;
    post_json(&format!("{url}/register_worker"), register_body(&other, "other", 0)).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(
            post_json(&format!("{url}/get_worker_address"), json!({"model": "m"})).await["address"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), expected);
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

    // A registered worker that stops answering: error 3 naming the model, not the worker's address.
    let (gone, serving) = spawn_stoppable(fake_worker("gone", vec![], false)).await;
    post_json(&format!("{url}/register_worker"), register_body(&gone, "gone", 0)).await;
    serving.abort();
    let _ = serving.await;
    let chunks = stream(&url, json!({"model": "gone"})).await;
    assert_eq!((chunks.len(), chunks[0].error_code), (1, 3));
    assert!(chunks[0].text.contains("`gone`") && chunks[0].text.contains("unreachable"), "{:?}", chunks[0]);
    assert!(!chunks[0].text.contains(&gone), "the worker's address leaks: {:?}", chunks[0]);

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

async fn register(url: &str, body: Value) -> (u16, String) {
    let r = client().post(format!("{url}/register_worker")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn registration_cannot_take_a_models_traffic() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10));
    let url = spawn_controller(c.clone()).await;
    let real = spawn_worker("m", vec!["real"], false).await;
    post_json(&format!("{url}/register_worker"), register_body(&real, "m", 0)).await;
    let silent = |name: &str| {
        json!({"worker_name": name, "check_heart_beat": false,
                                      "worker_status": {"model_names": ["m"], "speed": 1000, "queue_length": 0}})
    };
    // An address that answers nothing, with a fragment cutting the path off, with credentials, a query,
    // another scheme, the controller itself, and a live worker claiming a model it does not serve.
    let other = spawn_worker("other", vec!["hijacked"], false).await;
    let cases = [
        (silent("http://127.0.0.1:9"), "could not get the status"),
        (silent("http://127.0.0.1:9/evil#"), "query or fragment"),
        (silent(&format!("{real}/x?y=1")), "query or fragment"),
        (silent(&format!("http://user:pw@{}", real.trim_start_matches("http://"))), "credentials"),
        (silent("file:///etc/passwd"), "scheme"),
        (silent(&url), "this controller"),
        (silent(&other), "does not serve model `m`"),
    ];
    for (body, expected) in cases {
        let (status, text) = register(&url, body.clone()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(expected), "{body}: expected `{expected}` in {text}");
    }
    // Traffic for the model still goes to the real worker only.
    for _ in 0..5 {
        let chunks = stream(&url, json!({"model": "m", "prompt": "x"})).await;
        assert_eq!(chunks.last().map(|c| c.text.as_str()), Some("real"));
    }
}

#[tokio::test]
async fn workers_without_heart_beats_are_dropped_once_unreachable() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10))
        .with_expiration(Duration::from_millis(200));
    let url = spawn_controller(c.clone()).await;
    let (worker, serving) = spawn_stoppable(fake_worker("m", vec![], false)).await;
    let body = json!({"worker_name": worker, "check_heart_beat": false});
    post_json(&format!("{url}/register_worker"), body).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    c.probe_silent_workers().await;
    assert_eq!(c.list_models(), ["m"], "a silent worker that answers stays");
    serving.abort();
    let _ = serving.await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    c.probe_silent_workers().await;
    assert!(c.list_models().is_empty(), "an unreachable silent worker is dropped");
}

#[tokio::test]
async fn refreshing_keeps_the_table_in_use_and_drops_only_the_dead() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10));
    let url = spawn_controller(c.clone()).await;
    // A worker whose status takes a while: while the refresh waits for it, the model stays listed.
    let slow_status = WorkerStatus { model_names: vec!["slow".into()], speed: 1.0, queue_length: 0 };
    let slow = spawn(Router::new().route(
        "/worker_get_status",
        post(move || async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Json(slow_status.clone())
        }),
    ))
    .await;
    post_json(&format!("{url}/register_worker"), register_body(&slow, "slow", 0)).await;
    let (dead, serving) = spawn_stoppable(fake_worker("dead", vec![], false)).await;
    post_json(&format!("{url}/register_worker"), register_body(&dead, "dead", 0)).await;
    serving.abort();
    let _ = serving.await;
    let refresh = tokio::spawn({
        let url = url.clone();
        async move { post_json(&format!("{url}/refresh_all_workers"), json!({})).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(post_json(&format!("{url}/list_models"), json!({})).await["models"], json!(["dead", "slow"]));
    refresh.await.unwrap();
    assert_eq!(post_json(&format!("{url}/list_models"), json!({})).await["models"], json!(["slow"]));
}

#[tokio::test]
async fn extreme_queue_lengths_do_not_overflow() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10));
    let url = spawn_controller(c.clone()).await;
    let worker = spawn_worker("m", vec![], false).await;
    post_json(&format!("{url}/register_worker"), register_body(&worker, "m", 0)).await;
    for queue_length in [i64::MAX, i64::MIN] {
        let beat = post_json(
            &format!("{url}/receive_heart_beat"),
            json!({"worker_name": worker, "queue_length": queue_length}),
        )
        .await;
        assert_eq!(beat, json!({"exist": true}));
        for _ in 0..3 {
            let address = post_json(&format!("{url}/get_worker_address"), json!({"model": "m"})).await;
            assert_eq!(address["address"], json!(worker));
        }
    }
}

#[tokio::test]
async fn a_worker_that_never_ends_its_chunk_is_cut_off() {
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10));
    let url = spawn_controller(c).await;
    let status = WorkerStatus { model_names: vec!["flood".into()], speed: 1.0, queue_length: 0 };
    let flood =
        spawn(Router::new().route("/worker_get_status", post(move || async move { Json(status.clone()) })).route(
            "/worker_generate_stream",
            post(|| async {
                let piece = bytes::Bytes::from(vec![b'a'; 64 * 1024]);
                let body = futures_util::stream::repeat(piece).take(1024).map(Ok::<_, std::io::Error>);
                Body::from_stream(body)
            }),
        ))
        .await;
    post_json(&format!("{url}/register_worker"), register_body(&flood, "flood", 0)).await;
    let chunks =
        tokio::time::timeout(Duration::from_secs(30), stream(&url, json!({"model": "flood"}))).await.expect("no hang");
    assert_eq!(chunks.len(), 1, "{:?}", chunks.iter().map(|c| c.text.len()).collect::<Vec<_>>());
    assert_eq!(chunks[0].error_code, 3);
    assert!(chunks[0].text.contains("chunk longer than"), "{}", chunks[0].text);
}

#[tokio::test]
async fn with_an_api_key_every_call_needs_it_and_workers_are_called_with_it() {
    let key = "s3cret";
    let access = http::Access { api_key: Some(key.into()), allowed_hosts: vec![] };
    let c = Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10)).with_access(access.clone());
    let (listener, addr) = http::bind("127.0.0.1", 0).await.unwrap();
    let options = http::ServeOptions { access: access.clone(), ..Default::default() };
    tokio::spawn(http::serve_with(listener, controller_app(c), options));
    let url = format!("http://{addr}");
    // A worker that itself requires the key: registration works only if the controller sends it.
    let (worker_listener, worker_addr) = http::bind("127.0.0.1", 0).await.unwrap();
    let worker_options = http::ServeOptions { access, ..Default::default() };
    tokio::spawn(http::serve_with(worker_listener, fake_worker("m", vec!["ok"], false), worker_options));
    let worker = format!("http://{worker_addr}");

    let body = register_body(&worker, "m", 0);
    let r = client().post(format!("{url}/register_worker")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client().post(format!("{url}/list_models")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client().post(format!("{url}/register_worker")).bearer_auth(key).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = client().post(format!("{url}/worker_generate_stream")).bearer_auth(key).json(&json!({"model": "m"}));
    let bytes = r.send().await.unwrap().bytes().await.unwrap();
    let mut splitter = ChunkSplitter::default();
    let chunk: StreamChunk = serde_json::from_slice(&splitter.push(&bytes)[0]).unwrap();
    assert_eq!((chunk.text.as_str(), chunk.error_code), ("ok", 0));
    // Health checks stay open; OpenAI clients get OpenAI's error shape.
    assert!(client().get(format!("{url}/health")).send().await.unwrap().status().is_success());
    let r = client().get(format!("{url}/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("API key"));
}

#[tokio::test]
async fn loopback_servers_refuse_foreign_host_names() {
    let url = spawn_controller(Controller::new(DispatchMethod::ShortestQueue, Duration::from_secs(10))).await;
    let r = client().post(format!("{url}/list_models")).header("host", "rebound.example:21001").send().await.unwrap();
    assert_eq!(r.status(), 421);
    let r = client().post(format!("{url}/list_models")).header("host", "localhost:21001").send().await.unwrap();
    assert!(r.status().is_success());
}
