//! A model worker (arcana/serve/model_worker.py): loads one model on the engine's own thread, registers
//! with the controller, sends heart beats, and answers `/worker_generate_stream` with the release's
//! cumulative NUL-delimited chunks. Deviations from the release, each deliberate:
//! - images are used whenever the model has a vision tower (the release checks `"llava" in model_name`,
//!   so a worker named "Arcana" ignored them);
//! - a request without `stop` works (the release raised a TypeError), and generation stops at the stop
//!   string instead of only trimming it from the end;
//! - the context budget counts every image position, the 64 ladder tokens included;
//! - error chunks carry the cause ("image 1: not a recognised image format ...") rather than the one
//!   "NETWORK ERROR" text; codes are the release's.
use super::http::{Access, JsonBody};
use super::image_fetch::ImageFetchPolicy;
use super::limits::RequestLimits;
use super::openai::logprobs_json;
use super::protocol::STATUS_TIMEOUT;
use super::protocol::{error_code, HeartBeat, HeartBeatReply, RegisterWorker, StreamChunk, WorkerStatus};
use crate::engine::{CancelToken, EngineHandle, Event, GenerationParams, ImageInput, Request, RequestInput};
use crate::error::Error;
use crate::generate::constraint::Constraint;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::Semaphore;

/// The release's reply when the prompt leaves no room to generate (sent with error code 0).
pub const EXCEEDS_CONTEXT: &str = "Exceeds max token length. Please start a new conversation, thanks.";
/// `max_new_tokens` is capped at this, as in the release.
pub const MAX_NEW_TOKENS_CAP: usize = 1024;

/// Where the worker is and whom it reports to.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub model_name: String,
    /// This worker's URL as the controller should call it.
    pub worker_address: String,
    /// `None`: do not register (`--no-register`).
    pub controller_address: Option<String>,
    /// Requests generating at once; more wait in a queue (`--limit-model-concurrency`).
    pub limit_model_concurrency: usize,
    /// The OpenAI API may fetch `http(s)` image URLs (`--allow-image-urls`); otherwise they are refused.
    pub allow_image_urls: bool,
    /// Limits and address exceptions for those fetches (`--image-url-*`, `--max-image-urls-per-request`).
    pub image_fetch_policy: ImageFetchPolicy,
    /// Time between heart beats: the release's 15 s (shorter in tests).
    pub heart_beat_interval: Duration,
    /// The deployment's key, sent to the controller with registrations and heart beats.
    pub access: Access,
    /// Images and stop strings one request may carry.
    pub limits: RequestLimits,
}

/// Loading state of the model.
enum Model {
    Ready(EngineHandle),
    Failed(String),
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    failed_requests: AtomicU64,
    /// Requests whose client left before they reached the engine.
    abandoned_requests: AtomicU64,
    generated_tokens: AtomicU64,
    /// Time to first token, bucketed (seconds upper bounds in `TTFT_BUCKETS`).
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    ttft_sum_micros: AtomicU64,
}

const TTFT_BUCKETS: [f64; 8] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Shared worker state (cheap to clone).
#[derive(Clone)]
pub struct Worker {
    config: Arc<WorkerConfig>,
    model: Arc<OnceLock<Model>>,
    slots: Arc<Semaphore>,
    /// Requests admitted or waiting for a slot: the release's queue_length.
    queue_length: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    /// A heart beat is on its way: request arrivals do not send another.
    beat_pending: Arc<AtomicBool>,
}

impl Worker {
    pub fn new(config: WorkerConfig) -> Self {
        let slots = Arc::new(Semaphore::new(config.limit_model_concurrency.max(1)));
        Self {
            config: Arc::new(config),
            model: Arc::default(),
            slots,
            queue_length: Arc::default(),
            metrics: Arc::default(),
            client: reqwest::Client::new(),
            beat_pending: Arc::default(),
        }
    }

    /// The model is loaded: requests are served from now on.
    pub fn set_engine(&self, engine: EngineHandle) {
        let _ = self.model.set(Model::Ready(engine));
    }

    /// Loading failed: `/health` and requests say why.
    pub fn set_load_error(&self, message: String) {
        let _ = self.model.set(Model::Failed(message));
    }

    pub fn status(&self) -> WorkerStatus {
        WorkerStatus {
            model_names: vec![self.config.model_name.clone()],
            speed: 1.0,
            queue_length: self.queue_length.load(Ordering::SeqCst),
        }
    }

    /// Registers with the controller (with this worker's status), if there is one.
    pub async fn register(&self) -> Result<(), String> {
        let Some(controller) = &self.config.controller_address else { return Ok(()) };
        let body = RegisterWorker {
            worker_name: self.config.worker_address.clone(),
            check_heart_beat: true,
            worker_status: Some(self.status()),
        };
        let reply = self
            .config
            .access
            .authorize(self.client.post(format!("{controller}/register_worker")))
            .json(&body)
            .timeout(STATUS_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("controller at {controller} unreachable: {e}"))?;
        if !reply.status().is_success() {
            return Err(format!("controller at {controller} refused the registration: HTTP {}", reply.status()));
        }
        tracing::info!(controller, worker = self.config.worker_address, "registered");
        Ok(())
    }

    /// Tells the controller this worker is leaving, so it stops routing to it now rather than after
    /// the heart-beat expiry. A controller without the endpoint (the release's) answers 404: ignored.
    pub async fn unregister(&self) {
        let Some(controller) = &self.config.controller_address else { return };
        let body = super::protocol::UnregisterWorker { worker_name: self.config.worker_address.clone() };
        let reply = self
            .config
            .access
            .authorize(self.client.post(format!("{controller}/unregister_worker")))
            .json(&body)
            .timeout(STATUS_TIMEOUT)
            .send()
            .await;
        if let Err(e) = reply {
            tracing::warn!(controller, error = %e, "unregistering failed");
        }
    }

    /// One heart beat; re-registers when the controller no longer knows this worker (it restarted or
    /// dropped it).
    pub async fn heart_beat(&self) {
        let Some(controller) = &self.config.controller_address else { return };
        let body =
            HeartBeat { worker_name: self.config.worker_address.clone(), queue_length: self.status().queue_length };
        let reply = self
            .config
            .access
            .authorize(self.client.post(format!("{controller}/receive_heart_beat")))
            .json(&body)
            .timeout(STATUS_TIMEOUT)
            .send()
            .await;
        let exist = match reply {
            Ok(r) => r.json::<HeartBeatReply>().await.map(|r| r.exist).unwrap_or(false),
            Err(e) => {
                tracing::warn!(controller, error = %e, "heart beat failed");
                return;
            }
        };
        if !exist {
            if let Err(e) = self.register().await {
                tracing::warn!("re-registering failed: {e}");
            }
        }
    }

    /// A heart beat soon, off the caller's path; at most one on its way at a time.
    fn beat_soon(&self) {
        if self.config.controller_address.is_none() || self.beat_pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let worker = self.clone();
        tokio::spawn(async move {
            worker.heart_beat().await;
            worker.beat_pending.store(false, Ordering::SeqCst);
        });
    }

    /// Heart beats every `heart_beat_interval` (the release's `WORKER_HEART_BEAT_INTERVAL`).
    pub fn spawn_heart_beats(&self) -> tokio::task::JoinHandle<()> {
        let worker = self.clone();
        tokio::spawn(async move {
            if worker.config.controller_address.is_none() {
                return;
            }
            let mut tick = tokio::time::interval(worker.config.heart_beat_interval);
            loop {
                tick.tick().await;
                worker.heart_beat().await;
            }
        })
    }

    fn engine(&self) -> Result<&EngineHandle, String> {
        match self.model.get() {
            Some(Model::Ready(engine)) => Ok(engine),
            Some(Model::Failed(message)) => Err(format!("the model failed to load: {message}")),
            None => Err("the model is still loading".into()),
        }
    }
}

/// The release's `/worker_generate_stream` parameters, read leniently as the release does.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamParams {
    pub prompt: String,
    /// Base64-encoded image files, one per `<image>` in the prompt.
    pub images: Vec<String>,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub stop: Option<String>,
    /// This server's optional fields, one at most: `json_schema` (a JSON schema object), `regex` or
    /// `grammar` (Lark); the answer then follows it.
    pub constraint: Option<Constraint>,
    /// This server's optional `logprobs`: each token's log-probability with this many alternatives
    /// (`true` is 0); every chunk then carries those of the tokens since the previous chunk.
    pub logprobs: Option<usize>,
}

impl StreamParams {
    pub fn from_json(params: &serde_json::Value) -> Result<Self, String> {
        let number = |key: &str, default: f64| -> Result<f64, String> {
            match params.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                    .ok_or_else(|| format!("`{key}` must be a number, got {v}")),
            }
        };
        let prompt =
            params.get("prompt").and_then(|p| p.as_str()).ok_or("`prompt` (a string) is required")?.to_string();
        let images = match params.get("images") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(str::to_string).ok_or(format!("image {}: expected a base64 string", i + 1))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("`images` must be a list of base64 strings, got {other}")),
        };
        let max_new_tokens = number("max_new_tokens", 256.0)?;
        if max_new_tokens < 0.0 {
            return Err(format!("`max_new_tokens` must not be negative, got {max_new_tokens}"));
        }
        let stop = match params.get("stop") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s.is_empty() => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(format!("`stop` must be a string, got {other}")),
        };
        let text = |key: &str| match params.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("`{key}` must be a string, got {other}")),
        };
        let mut constraints = Vec::new();
        match params.get("json_schema") {
            None | Some(serde_json::Value::Null) => {}
            Some(schema @ serde_json::Value::Object(_)) => constraints.push(Constraint::JsonSchema(schema.clone())),
            Some(other) => return Err(format!("`json_schema` must be a JSON schema object, got {other}")),
        }
        constraints.extend(text("regex")?.map(Constraint::Regex));
        constraints.extend(text("grammar")?.map(Constraint::Lark));
        if constraints.len() > 1 {
            return Err("give one of `json_schema`, `regex` and `grammar`, not several".into());
        }
        let logprobs =
            match params.get("logprobs") {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => None,
                Some(serde_json::Value::Bool(true)) => Some(0),
                Some(v) => Some(v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                    format!("`logprobs` must be true or a count of alternatives (0 or more), got {v}")
                })?),
            };
        Ok(Self {
            prompt,
            images,
            temperature: number("temperature", 1.0)?,
            top_p: number("top_p", 1.0)?,
            max_new_tokens: (max_new_tokens as usize).min(MAX_NEW_TOKENS_CAP),
            stop,
            constraint: constraints.pop(),
            logprobs,
        })
    }

    /// The engine request: sampling when temperature > 0.001, as the release decides. Requests over
    /// `limits` are refused before any image is decoded.
    pub fn to_request(&self, limits: &RequestLimits) -> Result<Request, String> {
        limits.check_images(self.images.len())?;
        // The release's `stop` is one string.
        limits.check_stop(self.stop.as_slice())?;
        if let Some(constraint) = &self.constraint {
            limits.check_constraint(constraint)?;
        }
        if let Some(top) = self.logprobs {
            limits.check_top_logprobs(top)?;
        }
        let placeholders = self.prompt.matches("<image>").count();
        if placeholders != self.images.len() {
            return Err(format!(
                "Number of images does not match number of <image> tokens in prompt: {} image(s), {placeholders} <image> token(s)",
                self.images.len()
            ));
        }
        let images = self
            .images
            .iter()
            .enumerate()
            .map(|(i, b64)| {
                let bytes = decode_base64_image(b64).map_err(|e| format!("image {}: {e}", i + 1))?;
                Ok(ImageInput::Encoded { name: format!("image {}", i + 1), bytes })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let sampling = self.temperature > 0.001;
        let params = GenerationParams {
            temperature: if sampling { self.temperature } else { 0.0 },
            top_p: Some(self.top_p),
            top_k: None,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.iter().cloned().collect(),
            seed: None,
            logprobs: self.logprobs,
            constraint: self.constraint.clone(),
        };
        params.check().map_err(|e| e.to_string())?;
        Ok(Request { input: RequestInput::Prompt(self.prompt.clone()), images, params })
    }
}

/// Base64 (standard alphabet; a `data:...;base64,` prefix is accepted) to bytes.
pub fn decode_base64_image(text: &str) -> Result<Vec<u8>, String> {
    let payload = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text,
    };
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(compact).map_err(|e| format!("not valid base64: {e}"))
}

/// The worker's own routes: the release's two endpoints, `/health` and `/metrics` (the server adds the
/// OpenAI-compatible API, see [`super::worker_app`]).
pub fn routes(worker: Worker) -> Router {
    Router::new()
        .route("/worker_generate_stream", post(generate_stream))
        .route("/worker_get_status", post(get_status))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(worker)
}

impl Worker {
    /// How the OpenAI API fetches image URLs; `None` when it does not.
    pub fn image_fetching(&self) -> Option<ImageFetchPolicy> {
        self.config.allow_image_urls.then(|| self.config.image_fetch_policy.clone())
    }
}

async fn get_status(State(w): State<Worker>) -> Json<WorkerStatus> {
    Json(w.status())
}

async fn health(State(w): State<Worker>) -> Response {
    match w.engine() {
        Ok(_) => Json(serde_json::json!({"status": "ok", "model": w.config.model_name})).into_response(),
        Err(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": message, "model": w.config.model_name})),
        )
            .into_response(),
    }
}

async fn metrics(State(w): State<Worker>) -> Response {
    let m = &w.metrics;
    let mut text = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, value: String| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    };
    counter(
        "arcana_requests_total",
        "Generation requests received.",
        "counter",
        m.requests.load(Ordering::Relaxed).to_string(),
    );
    counter(
        "arcana_requests_failed_total",
        "Requests answered with an error.",
        "counter",
        m.failed_requests.load(Ordering::Relaxed).to_string(),
    );
    counter(
        "arcana_requests_abandoned_total",
        "Requests whose client left while they waited for a slot (never run).",
        "counter",
        m.abandoned_requests.load(Ordering::Relaxed).to_string(),
    );
    counter(
        "arcana_generated_tokens_total",
        "Tokens generated.",
        "counter",
        m.generated_tokens.load(Ordering::Relaxed).to_string(),
    );
    counter(
        "arcana_queue_length",
        "Requests generating or waiting.",
        "gauge",
        w.queue_length.load(Ordering::SeqCst).to_string(),
    );
    // The engine's decoding steps (zero while it loads).
    let stats = w.engine().map(|engine| engine.decode_stats()).unwrap_or_default();
    let decode_counters = [
        (
            "arcana_decode_steps_total",
            "Decoding steps (one forward for every running answer).",
            stats.steps.to_string(),
        ),
        ("arcana_decode_tokens_total", "Tokens generated by decoding steps.", stats.tokens.to_string()),
        (
            "arcana_decode_step_seconds_total",
            "Time in decoding steps, forward and token choice.",
            stats.step_seconds.to_string(),
        ),
        (
            "arcana_constrained_tokens_total",
            "Tokens chosen under a constraint in decoding steps.",
            stats.constrained_tokens.to_string(),
        ),
        (
            "arcana_constraint_seconds_total",
            "Time of decoding steps spent in constraints (masks and advances).",
            stats.constraint_seconds.to_string(),
        ),
    ];
    for (name, help, value) in decode_counters {
        counter(name, help, "counter", value);
    }
    // The reuse cache (image features and prompt KV caches kept for later requests).
    let reuse = w.engine().map(|engine| engine.reuse_stats()).unwrap_or_default();
    let reuse_metrics = [
        ("arcana_image_cache_hits_total", "Requests whose images' features were reused.", "counter", reuse.image_hits),
        ("arcana_image_cache_misses_total", "Requests whose images were encoded.", "counter", reuse.image_misses),
        ("arcana_prefix_cache_hits_total", "Prompts that started from reused positions.", "counter", reuse.prefix_hits),
        (
            "arcana_prefix_cache_misses_total",
            "Prompts computed from their first position.",
            "counter",
            reuse.prefix_misses,
        ),
        (
            "arcana_prefix_cache_reused_positions_total",
            "Prompt positions reused instead of computed.",
            "counter",
            reuse.reused_positions,
        ),
        ("arcana_reuse_cache_bytes", "Bytes the reuse cache holds.", "gauge", reuse.bytes),
        ("arcana_reuse_cache_entries", "Image sets and prompts the reuse cache holds.", "gauge", reuse.entries),
        ("arcana_reuse_cache_budget_bytes", "The reuse cache's budget (--reuse-cache-bytes).", "gauge", reuse.budget),
    ];
    for (name, help, kind, value) in reuse_metrics {
        counter(name, help, kind, value.to_string());
    }
    text.push_str("# HELP arcana_time_to_first_token_seconds Time from admission to the first token.\n");
    text.push_str("# TYPE arcana_time_to_first_token_seconds histogram\n");
    let mut cumulative = 0;
    for (bound, bucket) in TTFT_BUCKETS.iter().zip(&m.ttft_buckets) {
        cumulative += bucket.load(Ordering::Relaxed);
        text.push_str(&format!("arcana_time_to_first_token_seconds_bucket{{le=\"{bound}\"}} {cumulative}\n"));
    }
    let count = m.ttft_count.load(Ordering::Relaxed);
    text.push_str(&format!("arcana_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {count}\n"));
    let sum = m.ttft_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    text.push_str(&format!(
        "arcana_time_to_first_token_seconds_sum {sum}\narcana_time_to_first_token_seconds_count {count}\n"
    ));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn record_ttft(m: &Metrics, seconds: f64) {
    if let Some(i) = TTFT_BUCKETS.iter().position(|&b| seconds <= b) {
        m.ttft_buckets[i].fetch_add(1, Ordering::Relaxed);
    }
    m.ttft_count.fetch_add(1, Ordering::Relaxed);
    m.ttft_sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
}

/// Counts a request in the queue from arrival until its stream ends or is dropped.
struct QueueGuard(Arc<AtomicI64>);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn generate_stream(State(w): State<Worker>, JsonBody(params): JsonBody<serde_json::Value>) -> Response {
    w.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let fail = |w: &Worker, message: String| {
        w.metrics.failed_requests.fetch_add(1, Ordering::Relaxed);
        Response::new(Body::from(StreamChunk::error(error_code::WORKER_ERROR, message).to_wire()))
    };
    let params = match StreamParams::from_json(&params) {
        Ok(p) => p,
        Err(message) => return fail(&w, message),
    };
    let engine = match w.engine() {
        Ok(engine) => engine.clone(),
        Err(message) => return fail(&w, message),
    };
    // Decoding images takes time: off the async threads.
    let request = match tokio::task::spawn_blocking({
        let (params, limits) = (params.clone(), w.config.limits);
        move || params.to_request(&limits)
    })
    .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(message)) => return fail(&w, message),
        Err(e) => return fail(&w, format!("preparing the request failed: {e}")),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let (client, gone) = client_watch();
    let prompt = params.prompt;
    let mut text = prompt.clone();
    let with_logprobs = params.logprobs.is_some();
    // Log-probabilities of tokens whose text has not been sent yet: they go with the next chunk.
    let mut pending = Vec::new();
    w.spawn_answer(engine, request, gone, move |event| {
        let chunk = match event {
            Ok(Event::Text(delta)) => {
                text.push_str(&delta);
                StreamChunk::text(text.clone())
            }
            Ok(Event::Logprobs(token)) => {
                pending.push(token);
                return true;
            }
            // Tokens that added no text (EOS, a stop string held back) still report theirs.
            Ok(Event::Finished(_)) if !pending.is_empty() => StreamChunk::text(text.clone()),
            Ok(_) => return true,
            // The release answers a full context with this text and code 0.
            Err(Error::ContextFull { .. }) => StreamChunk::text(format!("{prompt}{EXCEEDS_CONTEXT}")),
            Err(e) => StreamChunk::error(error_code::WORKER_ERROR, e.to_string()),
        };
        let chunk = if with_logprobs && chunk.error_code == error_code::OK {
            chunk.with_logprobs(logprobs_json(&std::mem::take(&mut pending)))
        } else {
            chunk
        };
        sender.blocking_send(chunk.to_wire()).is_ok()
    })
    .await;
    Response::new(Body::from_stream(receiver_stream(receiver, client)))
}

/// A channel's items as a response body stream; `client` is dropped with the stream, when the answer
/// has been sent or the client has gone.
pub(super) fn receiver_stream<T: Send + 'static>(
    receiver: tokio::sync::mpsc::Receiver<T>,
    client: ClientPresent,
) -> impl futures_util::Stream<Item = Result<T, std::convert::Infallible>> {
    futures_util::stream::unfold((receiver, client), |(mut receiver, client)| async move {
        receiver.recv().await.map(|item| (Ok(item), (receiver, client)))
    })
}

/// Held by whatever serves a client its answer (the response body, or the handler awaiting a whole
/// answer); hyper drops it when the client disconnects.
pub(super) struct ClientPresent(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

/// Resolves once the paired [`ClientPresent`] is dropped.
pub(super) type ClientGone = tokio::sync::oneshot::Receiver<()>;

pub(super) fn client_watch() -> (ClientPresent, ClientGone) {
    let (present, gone) = tokio::sync::oneshot::channel();
    (ClientPresent(present), gone)
}

impl Worker {
    /// Queues `request` (counted in queue_length from now), waits for a slot, runs it on the engine and
    /// hands every event, or the error that ended it, to `forward` on a blocking thread. `forward`
    /// returns false when the client is gone. Once `gone` resolves (the client disconnected) the request
    /// leaves the queue, or is cancelled before its prefill or next token. Returns once it is queued.
    pub(super) async fn spawn_answer(
        &self,
        engine: EngineHandle,
        request: Request,
        gone: ClientGone,
        mut forward: impl FnMut(crate::Result<Event>) -> bool + Send + 'static,
    ) {
        self.queue_length.fetch_add(1, Ordering::SeqCst);
        let queued = QueueGuard(self.queue_length.clone());
        self.beat_soon();
        let worker = self.clone();
        tokio::spawn(async move {
            let mut gone = gone;
            let slot = tokio::select! {
                slot = worker.slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
                _ = &mut gone => {
                    worker.metrics.abandoned_requests.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let cancel = CancelToken::default();
            let watcher = tokio::spawn({
                let cancel = cancel.clone();
                async move {
                    let _ = gone.await;
                    cancel.cancel();
                }
            });
            let admitted = std::time::Instant::now();
            let metrics = worker.metrics.clone();
            let finished = tokio::task::spawn_blocking(move || {
                let answered = (|| {
                    let stream = match engine.submit_with(request, cancel) {
                        Ok(stream) => stream,
                        Err(e) => {
                            forward(Err(e));
                            return false;
                        }
                    };
                    let cancel = stream.cancel_token();
                    let mut first_token = true;
                    for event in stream {
                        let failed = event.is_err();
                        if let Ok(Event::Token(_)) = &event {
                            metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                            if std::mem::take(&mut first_token) {
                                record_ttft(&metrics, admitted.elapsed().as_secs_f64());
                            }
                        }
                        if !forward(event) {
                            cancel.cancel();
                            return true;
                        }
                        if failed {
                            return false;
                        }
                    }
                    true
                })();
                if !answered {
                    metrics.failed_requests.fetch_add(1, Ordering::Relaxed);
                }
                // Dropping `forward` ends the client's stream: the request leaves the queue and frees its
                // slot first, so a client that has read the whole answer no longer sees it queued.
                drop(slot);
                drop(queued);
                drop(forward);
            })
            .await;
            watcher.abort();
            if finished.is_err() {
                worker.metrics.failed_requests.fetch_add(1, Ordering::Relaxed);
            }
            worker.beat_soon();
        });
    }

    pub(super) fn limits(&self) -> &RequestLimits {
        &self.config.limits
    }

    pub(super) fn model_name(&self) -> &str {
        &self.config.model_name
    }

    pub(super) fn count_request(&self) {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn ready_engine(&self) -> Result<EngineHandle, String> {
        self.engine().cloned()
    }
}
