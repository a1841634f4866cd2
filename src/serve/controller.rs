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
//!
//! Registration is checked, since any client can post to it: the address must be a plain http(s) URL,
//! the controller itself fetches `/worker_get_status` there (a claimed status is never taken on trust)
//! and the worker must serve the models it claims; without an API key only loopback clients may
//! register, beat or unregister (unless `--allow-remote-workers`). Workers registered without heart
//! beats are probed each expiry period and dropped when they stop answering. Errors sent to clients
//! name the model, not the worker's address; the log has the details.
use super::http::{json_error, loggable, read_json, Access, JsonBody};
use super::protocol::{
    error_code, HeartBeat, HeartBeatReply, ModelList, ModelQuery, RegisterWorker, StreamChunk, UnregisterWorker,
    WorkerAddress, WorkerStatus, HEART_BEAT_EXPIRATION, STATUS_TIMEOUT,
};
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
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
    access: Access,
    allow_remote_workers: bool,
    /// Sent with this controller's status, so that registering the controller itself is recognised.
    instance: Arc<str>,
}

/// The header that carries a controller's instance id on its `/worker_get_status` reply.
pub const INSTANCE_HEADER: &str = "x-arcana-controller";

impl Controller {
    pub fn new(dispatch: DispatchMethod, stream_timeout: Duration) -> Self {
        // Redirects are not followed: a worker's address is where its requests go, nowhere else.
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap_or_default();
        Self {
            workers: Arc::default(),
            dispatch,
            client,
            expiration: HEART_BEAT_EXPIRATION,
            stream_timeout,
            access: Access::default(),
            allow_remote_workers: false,
            instance: format!("{:016x}", rand::random::<u64>()).into(),
        }
    }

    /// The key and host rules this controller serves under; the key is also sent to workers.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Accept registrations and heart beats from other machines even without an API key.
    pub fn allowing_remote_workers(mut self, allow: bool) -> Self {
        self.allow_remote_workers = allow;
        self
    }

    /// A POST to a worker, with this deployment's key.
    pub fn post(&self, url: String) -> reqwest::RequestBuilder {
        self.access.authorize(self.client.post(url))
    }

    /// Refuses registry changes from other machines unless a key guards them or they are allowed.
    fn registry_caller_allowed(&self, client: &SocketAddr) -> Result<(), Box<Response>> {
        if self.access.api_key.is_some() || self.allow_remote_workers || client.ip().is_loopback() {
            return Ok(());
        }
        tracing::warn!(client = %client, "registry change refused: not from loopback");
        Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "workers may register only from this machine: start the controller with --api-key (and the \
             workers with the same key) or --allow-remote-workers",
        )))
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

    /// Asks `worker` for its status; `Err` says why it cannot be used (for the log and the registrant).
    async fn probe(&self, worker: &str) -> Result<WorkerStatus, String> {
        let reply = self
            .post(format!("{worker}/worker_get_status"))
            .timeout(STATUS_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("no reply: {e}"))?;
        if !reply.status().is_success() {
            return Err(format!("status request answered HTTP {}", reply.status()));
        }
        if reply.headers().get(INSTANCE_HEADER).is_some_and(|id| id.as_bytes() == self.instance.as_bytes()) {
            return Err("that address is this controller".into());
        }
        let mut status: WorkerStatus = read_json(reply).await?;
        status.queue_length = status.queue_length.max(0);
        Ok(status)
    }

    /// Registers `worker` once its own status confirms what it claims.
    pub async fn register(
        &self,
        worker: &str,
        check_heart_beat: bool,
        claimed: Option<WorkerStatus>,
    ) -> Result<(), String> {
        let worker = worker_url(worker)?;
        let status = self.probe(&worker).await.map_err(|cause| {
            tracing::warn!(worker = loggable(&worker), cause = loggable(&cause), "registration refused");
            // The kind of failure only: connect errors would tell a registrant which ports are open.
            format!("could not get the status of worker {worker}: {}", cause.split(':').next().unwrap_or_default())
        })?;
        if let Some(model) = claimed.iter().flat_map(|c| &c.model_names).find(|m| !status.model_names.contains(m)) {
            return Err(format!(
                "worker {worker} does not serve model `{model}` (its status lists {:?})",
                status.model_names
            ));
        }
        tracing::info!(worker = loggable(&worker), models = ?status.model_names, "worker registered");
        self.lock().insert(worker, WorkerInfo { status, check_heart_beat, last_heart_beat: Instant::now() });
        Ok(())
    }

    /// Asks every worker for its status again; those that do not answer are dropped. The table stays
    /// in use meanwhile.
    pub async fn refresh_all(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        self.reprobe(names).await;
    }

    /// Workers registered without heart beats still have to answer: each is probed once per expiry
    /// period and dropped when it does not.
    pub async fn probe_silent_workers(&self) {
        let expiration = self.expiration;
        let silent: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, w)| !w.check_heart_beat && w.last_heart_beat.elapsed() >= expiration)
            .map(|(name, _)| name.clone())
            .collect();
        self.reprobe(silent).await;
    }

    /// Asks `names` for their status at once; those that answer are updated, the others dropped.
    async fn reprobe(&self, names: Vec<String>) {
        let results = futures_util::future::join_all(names.iter().map(|name| self.probe(name))).await;
        let mut workers = self.lock();
        for (name, result) in names.into_iter().zip(results) {
            match result {
                Ok(status) => {
                    if let Some(w) = workers.get_mut(&name) {
                        w.status = status;
                        w.last_heart_beat = Instant::now();
                    }
                }
                Err(cause) => {
                    tracing::info!(worker = loggable(&name), cause = loggable(&cause), "worker dropped: unreachable");
                    workers.remove(&name);
                }
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
                w.status.queue_length = w.status.queue_length.saturating_add(1);
            }
        }
        Some(chosen)
    }

    /// Records a heart beat; `false` when the worker is unknown (it should register again).
    pub fn heart_beat(&self, worker: &str, queue_length: i64) -> bool {
        let name = worker_url(worker).unwrap_or_default();
        match self.lock().get_mut(&name) {
            Some(w) => {
                w.status.queue_length = queue_length.max(0);
                w.last_heart_beat = Instant::now();
                true
            }
            None => {
                tracing::info!(worker = loggable(worker), "heart beat from an unknown worker");
                false
            }
        }
    }

    /// Removes a worker; `false` when it was not registered.
    pub fn unregister(&self, worker: &str) -> bool {
        let name = worker_url(worker).unwrap_or_default();
        let known = self.lock().remove(&name).is_some();
        tracing::info!(worker = loggable(worker), known, "worker unregistered");
        known
    }

    /// Drops workers whose last heart beat is older than the expiry.
    pub fn remove_expired(&self) {
        let expiration = self.expiration;
        self.lock().retain(|name, w| {
            let keep = !w.check_heart_beat || w.last_heart_beat.elapsed() <= expiration;
            if !keep {
                tracing::info!(worker = loggable(name), "worker expired: no heart beat");
            }
            keep
        });
    }

    /// The aggregate status of every worker, so this controller can register with another one.
    pub async fn aggregate_status(&self) -> WorkerStatus {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut total = WorkerStatus { model_names: vec![], speed: 0.0, queue_length: 0 };
        for name in names {
            if let Ok(s) = self.probe(&name).await {
                total.model_names.extend(s.model_names);
                total.speed += s.speed;
                total.queue_length = total.queue_length.saturating_add(s.queue_length);
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
            tracing::info!(model = loggable(&model), "no worker for model");
            let chunk =
                StreamChunk::error(error_code::NO_WORKER, format!("no worker serves model `{}`", loggable(&model)));
            return Body::from(chunk.to_wire());
        };
        let request = self.post(format!("{worker}/worker_generate_stream")).json(&params);
        let stream_timeout = self.stream_timeout;
        let stream = async_stream(request, worker, model, stream_timeout);
        Body::from_stream(stream)
    }
}

/// The worker's reply, re-cut on NUL bytes; any failure (connect, status, timeout, cut-off stream) ends
/// with one error-3 chunk naming the model and the kind of failure (the worker's address and the
/// details go to the log only).
fn async_stream(
    request: reqwest::RequestBuilder,
    worker: String,
    model: String,
    timeout: Duration,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::convert::Infallible>> {
    let unreachable = move |cause: String| {
        tracing::warn!(worker = loggable(&worker), model = loggable(&model), cause = loggable(&cause), "worker failed");
        let kind = cause.split(':').next().unwrap_or_default();
        Ok(StreamChunk::error(
            error_code::WORKER_UNREACHABLE,
            format!("the worker serving model `{}` is unreachable: {kind}", loggable(&model)),
        )
        .to_wire())
    };
    futures_util::stream::once(async move {
        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => return futures_util::stream::iter(vec![unreachable(format!("no reply in {timeout:?}"))]).boxed(),
            Ok(Err(e)) => return futures_util::stream::iter(vec![unreachable(format!("no connection: {e}"))]).boxed(),
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
                            if splitter.overflowed() {
                                let cause = format!("chunk longer than {} bytes", super::protocol::MAX_CHUNK_BYTES);
                                return Some((vec![unreachable(cause)], (body, splitter, true)));
                            }
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
            controller.probe_silent_workers().await;
        }
    })
}

async fn register_worker(
    State(c): State<Controller>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    JsonBody(body): JsonBody<RegisterWorker>,
) -> Response {
    if let Err(refused) = c.registry_caller_allowed(&client) {
        return *refused;
    }
    match c.register(&body.worker_name, body.check_heart_beat, body.worker_status).await {
        Ok(()) => Json(serde_json::Value::Null).into_response(),
        Err(message) => json_error(StatusCode::BAD_REQUEST, &message),
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
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    JsonBody(b): JsonBody<UnregisterWorker>,
) -> Response {
    if let Err(refused) = c.registry_caller_allowed(&client) {
        return *refused;
    }
    Json(HeartBeatReply { exist: c.unregister(&b.worker_name) }).into_response()
}

async fn receive_heart_beat(
    State(c): State<Controller>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    JsonBody(b): JsonBody<HeartBeat>,
) -> Response {
    if let Err(refused) = c.registry_caller_allowed(&client) {
        return *refused;
    }
    Json(HeartBeatReply { exist: c.heart_beat(&b.worker_name, b.queue_length) }).into_response()
}

async fn worker_generate_stream(
    State(c): State<Controller>,
    JsonBody(params): JsonBody<serde_json::Value>,
) -> Response {
    Response::new(c.generate_stream(params))
}

async fn worker_get_status(State(c): State<Controller>) -> Response {
    let mut reply = Json(c.aggregate_status().await).into_response();
    if let Ok(id) = axum::http::HeaderValue::from_str(&c.instance) {
        reply.headers_mut().insert(INSTANCE_HEADER, id);
    }
    reply
}

/// A worker's address as registered: an http(s) URL with a host and nothing that could redirect its
/// requests elsewhere (credentials, a query, a fragment); no trailing slash.
pub fn worker_url(text: &str) -> Result<String, String> {
    let refuse = |why: &str| Err(format!("worker address `{}` refused: {why}", loggable(text)));
    let Ok(url) = reqwest::Url::parse(text) else { return refuse("not a URL") };
    if !matches!(url.scheme(), "http" | "https") {
        return refuse("the scheme must be http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return refuse("it has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("it carries credentials");
    }
    if url.query().is_some() || url.fragment().is_some() || text.contains(['#', '?']) {
        return refuse("it has a query or fragment");
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}
