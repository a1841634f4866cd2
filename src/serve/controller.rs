//! The controller of the release's serving stack (arcana/serve/controller.py): workers register and
//! send heart beats, clients ask which worker serves a model, and `/worker_generate_stream` is proxied
//! to one. Same endpoints, bodies, dispatch rules and expiry as the release, with these deviations:
//! - with no worker for the model the stream is one chunk, error 2 (the release then still posts to ""
//!   and sends a second chunk, error 3);
//! - error chunks say what happened ("no worker serves model X", "worker at URL unreachable: ...")
//!   instead of the release's one "NETWORK ERROR DUE TO HIGH TRAFFIC" text, codes unchanged;
//! - a worker that stops mid-stream ends the client's stream with an error-3 chunk rather than a cut;
//! - the wait for a worker's next chunk is `stream_timeout` (the release's 5 s would cut off CPU
//!   prefills that take longer).
use super::http::{json_error, JsonBody};
use super::protocol::{
    error_code, HeartBeat, HeartBeatReply, ModelList, ModelQuery, RegisterWorker, StreamChunk, UnregisterWorker,
    WorkerAddress, WorkerStatus, HEART_BEAT_EXPIRATION, STATUS_TIMEOUT,
};
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchMethod {
    /// A worker drawn with probability proportional to its speed.
    Lottery,
    /// The worker with the smallest queue_length / speed; its queue length then counts one more.
    ShortestQueue,
}

impl std::str::FromStr for DispatchMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lottery" => Ok(Self::Lottery),
            "shortest_queue" => Ok(Self::ShortestQueue),
            other => Err(format!("invalid dispatch method `{other}` (lottery or shortest_queue)")),
        }
    }
}

#[derive(Debug, Clone)]
struct WorkerInfo {
    status: WorkerStatus,
    check_heart_beat: bool,
    last_heart_beat: Instant,
}

/// The controller's state; cheap to clone (shared).
#[derive(Clone)]
pub struct Controller {
    workers: Arc<Mutex<BTreeMap<String, WorkerInfo>>>,
    dispatch: DispatchMethod,
    client: reqwest::Client,
    expiration: Duration,
    stream_timeout: Duration,
}

impl Controller {
    pub fn new(dispatch: DispatchMethod, stream_timeout: Duration) -> Self {
        Self {
            workers: Arc::default(),
            dispatch,
            client: reqwest::Client::new(),
            expiration: HEART_BEAT_EXPIRATION,
            stream_timeout,
        }
    }

    /// The HTTP client the controller calls workers with.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Shorter heart-beat expiry, for tests.
    pub fn with_expiration(mut self, expiration: Duration) -> Self {
        self.expiration = expiration;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WorkerInfo>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts/removes).
        self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn worker_status(&self, worker: &str) -> Option<WorkerStatus> {
        let reply = self.client.post(format!("{worker}/worker_get_status")).timeout(STATUS_TIMEOUT).send().await;
        match reply {
            Ok(r) if r.status().is_success() => r.json().await.ok(),
            Ok(r) => {
                tracing::warn!(worker, status = %r.status(), "status request failed");
                None
            }
            Err(e) => {
                tracing::warn!(worker, error = %e, "status request failed");
                None
            }
        }
    }

    pub async fn register(&self, worker: &str, check_heart_beat: bool, status: Option<WorkerStatus>) -> bool {
        let status = match status {
            Some(s) => s,
            None => match self.worker_status(worker).await {
                Some(s) => s,
                None => return false,
            },
        };
        tracing::info!(worker, ?status, "worker registered");
        self.lock()
            .insert(worker.to_string(), WorkerInfo { status, check_heart_beat, last_heart_beat: Instant::now() });
        true
    }

    pub async fn refresh_all(&self) {
        let old: Vec<(String, bool)> = {
            let mut workers = self.lock();
            let old = workers.iter().map(|(n, w)| (n.clone(), w.check_heart_beat)).collect();
            workers.clear();
            old
        };
        for (name, check) in old {
            if !self.register(&name, check, None).await {
                tracing::info!(worker = name, "removed stale worker");
            }
        }
    }

    pub fn list_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self.lock().values().flat_map(|w| w.status.model_names.iter().cloned()).collect();
        models.sort();
        models.dedup();
        models
    }

    /// The worker for `model` by the dispatch rule; `None` when none serves it.
    pub fn worker_for(&self, model: &str) -> Option<String> {
        let mut workers = self.lock();
        let candidates: Vec<(&String, &WorkerInfo)> =
            workers.iter().filter(|(_, w)| w.status.model_names.iter().any(|m| m == model)).collect();
        let chosen = match self.dispatch {
            DispatchMethod::Lottery => {
                let total: f64 = candidates.iter().map(|(_, w)| w.status.speed.max(0.0)).sum();
                if total < 1e-4 {
                    return None;
                }
                let mut draw = rand::random::<f64>() * total;
                let mut chosen = candidates.last().map(|(n, _)| (*n).clone());
                for (name, w) in &candidates {
                    draw -= w.status.speed.max(0.0);
                    if draw < 0.0 {
                        chosen = Some((*name).clone());
                        break;
                    }
                }
                chosen
            }
            DispatchMethod::ShortestQueue => {
                // First minimum, as numpy's argmin; a zero speed counts as an infinitely long queue.
                let load = |w: &WorkerInfo| {
                    if w.status.speed > 0.0 {
                        w.status.queue_length as f64 / w.status.speed
                    } else {
                        f64::INFINITY
                    }
                };
                candidates
                    .iter()
                    .fold(None::<(&String, f64)>, |best, (name, w)| match best {
                        Some((_, b)) if b <= load(w) => best,
                        _ => Some((name, load(w))),
                    })
                    .map(|(name, _)| name.clone())
            }
        }?;
        if self.dispatch == DispatchMethod::ShortestQueue {
            if let Some(w) = workers.get_mut(&chosen) {
                w.status.queue_length += 1;
            }
        }
        Some(chosen)
    }

    /// Records a heart beat; `false` when the worker is unknown (it should register again).
    pub fn heart_beat(&self, worker: &str, queue_length: i64) -> bool {
        match self.lock().get_mut(worker) {
            Some(w) => {
                w.status.queue_length = queue_length;
                w.last_heart_beat = Instant::now();
                true
            }
            None => {
                tracing::info!(worker, "heart beat from an unknown worker");
                false
            }
        }
    }

    /// Removes a worker; `false` when it was not registered.
    pub fn unregister(&self, worker: &str) -> bool {
        let known = self.lock().remove(worker).is_some();
        tracing::info!(worker, known, "worker unregistered");
        known
    }

    /// Drops workers whose last heart beat is older than the expiry.
    pub fn remove_expired(&self) {
        let expiration = self.expiration;
        self.lock().retain(|name, w| {
            let keep = !w.check_heart_beat || w.last_heart_beat.elapsed() <= expiration;
            if !keep {
                tracing::info!(worker = name.as_str(), "worker expired: no heart beat");
            }
            keep
        });
    }

    /// The aggregate status of every worker, so this controller can register with another one.
    pub async fn aggregate_status(&self) -> WorkerStatus {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut total = WorkerStatus { model_names: vec![], speed: 0.0, queue_length: 0 };
        for name in names {
            if let Some(s) = self.worker_status(&name).await {
                total.model_names.extend(s.model_names);
                total.speed += s.speed;
                total.queue_length += s.queue_length;
            }
        }
        total.model_names.sort();
        total.model_names.dedup();
        total
    }

    /// Proxies a generation request to a worker for `params["model"]`, as a NUL-delimited chunk stream.
    pub fn generate_stream(&self, params: serde_json::Value) -> Body {
        let model = params.get("model").and_then(|m| m.as_str()).unwrap_or("").to_string();
        let Some(worker) = self.worker_for(&model) else {
            tracing::info!(model, "no worker for model");
            let chunk = StreamChunk::error(error_code::NO_WORKER, format!("no worker serves model `{model}`"));
            return Body::from(chunk.to_wire());
        };
        let request = self.client.post(format!("{worker}/worker_generate_stream")).json(&params);
        let stream_timeout = self.stream_timeout;
        let stream = async_stream(request, worker, stream_timeout);
        Body::from_stream(stream)
    }
}

/// The worker's reply, re-cut on NUL bytes; any failure (connect, status, timeout, cut-off stream) ends
/// with one error-3 chunk naming the worker and the cause.
fn async_stream(
    request: reqwest::RequestBuilder,
    worker: String,
    timeout: Duration,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::convert::Infallible>> {
    let unreachable = move |cause: String| {
        Ok(StreamChunk::error(error_code::WORKER_UNREACHABLE, format!("worker at {worker} unreachable: {cause}"))
            .to_wire())
    };
    futures_util::stream::once(async move {
        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => return futures_util::stream::iter(vec![unreachable(format!("no reply in {timeout:?}"))]).boxed(),
            Ok(Err(e)) => return futures_util::stream::iter(vec![unreachable(e.to_string())]).boxed(),
            Ok(Ok(r)) if !r.status().is_success() => {
                return futures_util::stream::iter(vec![unreachable(format!("HTTP {}", r.status()))]).boxed()
            }
            Ok(Ok(r)) => r,
        };
        let state = (response.bytes_stream(), super::protocol::ChunkSplitter::default(), false);
        futures_util::stream::unfold(state, move |(mut body, mut splitter, done)| {
            let unreachable = unreachable.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    match tokio::time::timeout(timeout, body.next()).await {
                        Err(_) => {
                            let cause = format!("no output for {timeout:?}");
                            return Some((vec![unreachable(cause)], (body, splitter, true)));
                        }
                        Ok(Some(Err(e))) => {
                            let cause = format!("stream broken: {e}");
                            return Some((vec![unreachable(cause)], (body, splitter, true)));
                        }
                        Ok(None) if splitter.remainder().is_empty() => return None,
                        Ok(None) => {
                            let cause = "stream cut off mid-chunk".to_string();
                            return Some((vec![unreachable(cause)], (body, splitter, true)));
                        }
                        Ok(Some(Ok(bytes))) => {
                            let chunks = splitter.push(&bytes);
                            if !chunks.is_empty() {
                                let wire = chunks
                                    .into_iter()
                                    .map(|mut c| {
                                        c.push(0);
                                        Ok(c)
                                    })
                                    .collect();
                                return Some((wire, (body, splitter, false)));
                            }
                        }
                    }
                }
            }
        })
        .flat_map(futures_util::stream::iter)
        .boxed()
    })
    .flatten()
}

/// The controller's own HTTP routes: the release's and `/health` (the server adds the OpenAI-compatible
/// API, see [`super::controller_app`]).
pub fn routes(controller: Controller) -> Router {
    Router::new()
        .route("/register_worker", post(register_worker))
        .route("/refresh_all_workers", post(refresh_all_workers))
        .route("/list_models", post(list_models))
        .route("/get_worker_address", post(get_worker_address))
        .route("/receive_heart_beat", post(receive_heart_beat))
        .route("/unregister_worker", post(unregister_worker))
        .route("/worker_generate_stream", post(worker_generate_stream))
        .route("/worker_get_status", post(worker_get_status))
        .route("/health", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .with_state(controller)
}

/// Removes expired workers every expiry period, as the release's heart-beat thread does.
pub fn spawn_expiry(controller: Controller) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(controller.expiration);
        tick.tick().await;
        loop {
            tick.tick().await;
            controller.remove_expired();
        }
    })
}

async fn register_worker(State(c): State<Controller>, JsonBody(body): JsonBody<RegisterWorker>) -> Response {
    let ok = c.register(&body.worker_name, body.check_heart_beat, body.worker_status).await;
    if ok {
        Json(serde_json::Value::Null).into_response()
    } else {
        json_error(StatusCode::BAD_GATEWAY, &format!("could not get the status of worker {}", body.worker_name))
    }
}

async fn refresh_all_workers(State(c): State<Controller>) -> Json<serde_json::Value> {
    c.refresh_all().await;
    Json(serde_json::Value::Null)
}

async fn list_models(State(c): State<Controller>) -> Json<ModelList> {
    Json(ModelList { models: c.list_models() })
}

async fn get_worker_address(State(c): State<Controller>, JsonBody(q): JsonBody<ModelQuery>) -> Json<WorkerAddress> {
    Json(WorkerAddress { address: c.worker_for(&q.model).unwrap_or_default() })
}

/// Not in the release (its workers only expire): a worker shutting down removes itself at once.
async fn unregister_worker(
    State(c): State<Controller>,
    JsonBody(b): JsonBody<UnregisterWorker>,
) -> Json<HeartBeatReply> {
    Json(HeartBeatReply { exist: c.unregister(&b.worker_name) })
}

async fn receive_heart_beat(State(c): State<Controller>, JsonBody(b): JsonBody<HeartBeat>) -> Json<HeartBeatReply> {
    Json(HeartBeatReply { exist: c.heart_beat(&b.worker_name, b.queue_length) })
}

async fn worker_generate_stream(
    State(c): State<Controller>,
    JsonBody(params): JsonBody<serde_json::Value>,
) -> Response {
    Response::new(c.generate_stream(params))
}

async fn worker_get_status(State(c): State<Controller>) -> Json<WorkerStatus> {
    Json(c.aggregate_status().await)
}
