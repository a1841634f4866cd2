//! An OpenAI-compatible API on the worker (`GET /v1/models`, `POST /v1/chat/completions`, streamed as
//! server-sent events or not) and, routed by `model`, through the controller. Messages are rendered
//! with the model's template as the CLI does; images come as `data:` URLs (remote URLs only with
//! `--allow-image-urls`). Errors use OpenAI's `{"error": {"message", "type", "param", "code"}}` shape.
use super::controller::Controller;
use super::http::loggable;
use super::image_fetch::{fetch_image, ImageFetchPolicy};
use super::limits::RequestLimits;
use super::worker::{client_watch, decode_base64_image, receiver_stream, Worker};
use crate::engine::{
    ChatMessage, Event, FinishReason, GenerationParams, ImageInput, Request, RequestInput, Role, TokenLogprob,
    TokenLogprobs,
};
use crate::error::Error;
use crate::generate::constraint::Constraint;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// An OpenAI-style error reply.
pub fn openai_error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn rejected(rejection: &JsonRejection) -> Response {
    openai_error(super::http::rejection_status(rejection), &rejection.body_text(), "invalid_request_error", None)
}

fn invalid(message: impl AsRef<str>) -> Response {
    openai_error(StatusCode::BAD_REQUEST, message.as_ref(), "invalid_request_error", None)
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatCompletionMessage>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<usize>,
    /// Newer clients send this instead of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub response_format: Option<ResponseFormat>,
    /// Each token's log-probability in the answer.
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many most likely alternatives per token.
    pub top_logprobs: Option<usize>,
}

/// OpenAI's `response_format`, with two extensions of this server: `regex` and `grammar` (Lark).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema {
        json_schema: JsonSchemaFormat,
    },
    /// `{"type": "regex", "regex": "[0-9]{3}-[a-z]+"}`: the whole answer matches it.
    Regex {
        regex: String,
    },
    /// `{"type": "grammar", "grammar": "start: ..."}`: a Lark grammar as llguidance reads it.
    Grammar {
        grammar: String,
    },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    /// Absent: any JSON value.
    pub schema: Option<Value>,
    /// Accepted; answers always follow the schema.
    pub strict: Option<bool>,
}

impl ResponseFormat {
    fn constraint(&self) -> Option<Constraint> {
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(Constraint::JsonObject),
            ResponseFormat::JsonSchema { json_schema } => {
                Some(Constraint::JsonSchema(json_schema.schema.clone().unwrap_or_else(|| json!({}))))
            }
            ResponseFormat::Regex { regex } => Some(Constraint::Regex(regex.clone())),
            ResponseFormat::Grammar { grammar } => Some(Constraint::Lark(grammar.clone())),
        }
    }
}

impl ChatCompletionRequest {
    /// The `image_url` parts of every message.
    pub fn image_count(&self) -> usize {
        let images = |m: &ChatCompletionMessage| match &m.content {
            Some(MessageContent::Parts(parts)) => {
                parts.iter().filter(|p| matches!(p, ContentPart::ImageUrl { .. })).count()
            }
            _ => 0,
        };
        self.messages.iter().map(images).sum()
    }
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

/// Where an image of a message comes from.
enum ImageSource {
    Data(Vec<u8>),
    Remote(String),
}

/// The engine request of a chat completion; images that need fetching are returned as URLs, at most
/// the policy's number of them (`image_urls` is `None` where URLs are not fetched). Requests over
/// `limits` are refused before any image is read.
fn to_request(
    body: &ChatCompletionRequest,
    image_urls: Option<&ImageFetchPolicy>,
    limits: &RequestLimits,
) -> Result<(Request, Vec<ImageSource>), String> {
    if body.n.is_some_and(|n| n != 1) {
        return Err("only n = 1 is supported".into());
    }
    if body.messages.is_empty() {
        return Err("`messages` is empty".into());
    }
    limits.check_images(body.image_count())?;
    let mut messages = Vec::new();
    let mut images = Vec::new();
    for (i, m) in body.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => return Err(format!("messages[{i}]: unsupported role `{other}` (system, user or assistant)")),
        };
        let (mut text, mut count) = (String::new(), 0);
        match &m.content {
            None => {}
            Some(MessageContent::Text(t)) => text.push_str(t),
            Some(MessageContent::Parts(parts)) => {
                for part in parts {
                    match part {
                        ContentPart::Text { text: t } => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(t);
                        }
                        ContentPart::ImageUrl { image_url } => {
                            if role != Role::User {
                                return Err(format!("messages[{i}]: only user messages can carry images"));
                            }
                            images.push(
                                image_source(&image_url.url, image_urls.is_some())
                                    .map_err(|e| format!("messages[{i}]: {e}"))?,
                            );
                            count += 1;
                        }
                    }
                }
            }
        }
        messages.push(ChatMessage { role, text, images: count });
    }
    let url_count = images.iter().filter(|image| matches!(image, ImageSource::Remote(_))).count();
    if let Some(policy) = image_urls.filter(|policy| url_count > policy.max_urls_per_request) {
        return Err(format!(
            "{url_count} image URLs in one request, more than the limit of {} (send the others as data: URLs)",
            policy.max_urls_per_request
        ));
    }
    if messages.last().map(|m| m.role) != Some(Role::User) {
        return Err("the last message must come from the user".into());
    }
    let temperature = body.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(format!("`temperature` must be within [0, 2], got {temperature}"));
    }
    let stop = match &body.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    limits.check_stop(&stop)?;
    let constraint = body.response_format.as_ref().and_then(ResponseFormat::constraint);
    if let Some(constraint) = &constraint {
        limits.check_constraint(constraint)?;
    }
    let logprobs = match (body.logprobs.unwrap_or(false), body.top_logprobs) {
        (true, top) => {
            let top = top.unwrap_or(0);
            limits.check_top_logprobs(top)?;
            Some(top)
        }
        (false, Some(_)) => return Err("`top_logprobs` needs `logprobs: true`".into()),
        (false, None) => None,
    };
    let params = GenerationParams {
        temperature,
        top_p: Some(body.top_p.unwrap_or(1.0)),
        top_k: Some(0),
        max_new_tokens: body
            .max_completion_tokens
            .or(body.max_tokens)
            .unwrap_or(GenerationParams::default().max_new_tokens),
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        seed: body.seed,
        logprobs,
        constraint,
    };
    params.check().map_err(|e| e.to_string())?;
    let request = Request { input: RequestInput::Conversation(messages), images: Vec::new(), params };
    Ok((request, images))
}

fn image_source(url: &str, allow_image_urls: bool) -> Result<ImageSource, String> {
    if url.starts_with("data:") {
        return decode_base64_image(url).map(ImageSource::Data);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        if !allow_image_urls {
            return Err(format!(
                "remote image URL {url} refused: this worker does not fetch URLs (send the image as a data: URL, \
                 or start the worker with --allow-image-urls)"
            ));
        }
        return Ok(ImageSource::Remote(url.to_string()));
    }
    Err("an image_url must be a data: URL (data:image/png;base64,...) or, if allowed, an http(s) URL".into())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("chatcmpl-{:x}{:06x}", now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// OpenAI's finish reasons; an answer whose constraint allowed no further token is this server's own
/// `no_allowed_token`.
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled | FinishReason::Complete => "stop",
        FinishReason::NoAllowedToken => "no_allowed_token",
    }
}

/// One token in OpenAI's `logprobs.content` shape.
fn logprob_json(token: &TokenLogprob) -> Value {
    json!({"token": token.token, "logprob": token.logprob, "bytes": token.bytes})
}

/// OpenAI's `logprobs` object for these tokens (also the release protocol's `logprobs` field).
pub(super) fn logprobs_json(tokens: &[TokenLogprobs]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut entry = logprob_json(&t.chosen);
            entry["top_logprobs"] = Value::Array(t.top.iter().map(logprob_json).collect());
            entry
        })
        .collect();
    json!({"content": content})
}

/// OpenAI's `usage` object.
fn usage_json(usage: crate::engine::Usage) -> Value {
    json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
           "total_tokens": usage.prompt_tokens + usage.completion_tokens})
}

/// `GET /v1/models` of one worker.
pub fn models_reply(names: &[String]) -> Json<Value> {
    let created = now();
    let data: Vec<Value> =
        names.iter().map(|n| json!({"id": n, "object": "model", "created": created, "owned_by": "arcana"})).collect();
    Json(json!({"object": "list", "data": data}))
}

/// The body of an error that ended an answer: a full context is the client's to fix (400).
fn answer_error(e: &Error) -> (StatusCode, &'static str, Option<&'static str>) {
    match e {
        Error::ContextFull { .. } => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", Some("context_length_exceeded"))
        }
        Error::Image { .. } | Error::InvalidInput(_) | Error::Prompt(_) => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", None)
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
    }
}

/// `POST /v1/chat/completions` on a worker.
pub async fn chat_completions(
    worker: Worker,
    image_urls: Option<ImageFetchPolicy>,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Response {
    worker.count_request();
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return rejected(&rejection),
    };
    let model = worker.model_name().to_string();
    if let Some(asked) = body.model.as_deref().filter(|m| !m.is_empty() && *m != model) {
        return openai_error(
            StatusCode::NOT_FOUND,
            &format!("model `{asked}` is not served here (this worker serves `{model}`)"),
            "invalid_request_error",
            Some("model_not_found"),
        );
    }
    let engine = match worker.ready_engine() {
        Ok(engine) => engine,
        Err(message) => return openai_error(StatusCode::SERVICE_UNAVAILABLE, &message, "server_error", None),
    };
    let (mut request, sources) = match to_request(&body, image_urls.as_ref(), worker.limits()) {
        Ok(r) => r,
        Err(message) => return invalid(message),
    };
    for (i, source) in sources.into_iter().enumerate() {
        let bytes = match source {
            ImageSource::Data(bytes) => bytes,
            ImageSource::Remote(url) => {
                // `to_request` returns remote sources only under a policy.
                let Some(policy) = image_urls.as_ref() else { return invalid("image URLs are not fetched here") };
                match fetch_image(&url, policy).await {
                    Ok(bytes) => bytes,
                    Err(e) => return invalid(format!("image {}: {e}", i + 1)),
                }
            }
        };
        request.images.push(ImageInput::Encoded { name: format!("image {}", i + 1), bytes });
    }
    let id = completion_id();
    let created = now();
    if body.stream {
        let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
        stream_completion(worker, engine, request, id, created, model, include_usage).await
    } else {
        whole_completion(worker, engine, request, id, created, model).await
    }
}

/// The answer's parts as its events come.
type WholeAnswer = (String, Vec<TokenLogprobs>, crate::engine::Finish);

async fn whole_completion(
    worker: Worker,
    engine: crate::engine::EngineHandle,
    request: Request,
    id: String,
    created: u64,
    model: String,
) -> Response {
    let with_logprobs = request.params.logprobs.is_some();
    let (sender, receiver) = tokio::sync::oneshot::channel::<Result<WholeAnswer, Error>>();
    let mut sender = Some(sender);
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    // Held while this handler waits: a client that disconnects drops it, which cancels the answer.
    let (_client, gone) = client_watch();
    worker
        .spawn_answer(engine, request, gone, move |event| {
            match event {
                Ok(Event::Text(delta)) => text.push_str(&delta),
                Ok(Event::Logprobs(token)) => logprobs.push(token),
                Ok(Event::Finished(finish)) => {
                    if let Some(s) = sender.take() {
                        let _ = s.send(Ok((std::mem::take(&mut text), std::mem::take(&mut logprobs), finish)));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(s) = sender.take() {
                        let _ = s.send(Err(e));
                    }
                }
            }
            true
        })
        .await;
    match receiver.await {
        Ok(Ok((text, logprobs, finish))) => Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": if with_logprobs { logprobs_json(&logprobs) } else { Value::Null },
                         "finish_reason": finish_reason(finish.reason)}],
            "usage": usage_json(finish.usage),
        }))
        .into_response(),
        Ok(Err(e)) => error_reply(&e),
        Err(_) => {
            openai_error(StatusCode::INTERNAL_SERVER_ERROR, "the answer ended without a result", "server_error", None)
        }
    }
}

fn error_reply(e: &Error) -> Response {
    let (status, kind, code) = answer_error(e);
    openai_error(status, &e.to_string(), kind, code)
}

async fn stream_completion(
    worker: Worker,
    engine: crate::engine::EngineHandle,
    request: Request,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> Response {
    let with_logprobs = request.params.logprobs.is_some();
    let (sender, receiver) = tokio::sync::mpsc::channel::<String>(64);
    // Whether the answer started: a request refused before its first token (a constraint that does not
    // compile, a full context, a bad image) gets an HTTP error instead of an event stream.
    let (started_sender, started) = tokio::sync::oneshot::channel::<Result<(), Error>>();
    let mut started_sender = Some(started_sender);
    let frame = move |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    };
    // Log-probabilities of tokens whose text has not been sent yet: they go with the next text.
    let mut pending = Vec::new();
    let delta_choice = move |delta: Value, pending: &mut Vec<TokenLogprobs>, finish: Option<&str>| {
        let mut choice = json!({"index": 0, "delta": delta, "finish_reason": finish});
        if with_logprobs {
            choice["logprobs"] = logprobs_json(&std::mem::take(pending));
        }
        json!([choice])
    };
    let (client, gone) = client_watch();
    worker
        .spawn_answer(engine, request, gone, move |event| {
            if let Some(started) = started_sender.take() {
                match event {
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return false;
                    }
                    Ok(_) => {
                        let _ = started.send(Ok(()));
                    }
                }
                let role = json!({"role": "assistant", "content": ""});
                if sender.blocking_send(frame(delta_choice(role, &mut Vec::new(), None), None)).is_err() {
                    return false;
                }
                return true;
            }
            let mut frames = Vec::new();
            match event {
                Ok(Event::Text(delta)) => {
                    frames.push(frame(delta_choice(json!({"content": delta}), &mut pending, None), None))
                }
                Ok(Event::Logprobs(token)) => pending.push(token),
                Ok(Event::Finished(finish)) => {
                    let reason = finish_reason(finish.reason);
                    frames.push(frame(delta_choice(json!({}), &mut pending, Some(reason)), None));
                    if include_usage {
                        let usage = usage_json(finish.usage);
                        frames.push(frame(json!([]), Some(usage)));
                    }
                    frames.push("data: [DONE]\n\n".to_string());
                }
                Ok(_) => {}
                Err(e) => {
                    // Headers are gone already: the error travels as an event, then the stream ends.
                    let (_, kind, code) = answer_error(&e);
                    let body = json!({"error": {"message": e.to_string(), "type": kind, "param": null, "code": code}});
                    frames.push(format!("data: {body}\n\n"));
                    frames.push("data: [DONE]\n\n".to_string());
                }
            }
            frames.into_iter().all(|f| sender.blocking_send(f).is_ok())
        })
        .await;
    match started.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return error_reply(&e),
        Err(_) => {
            return openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the answer ended before it started",
                "server_error",
                None,
            )
        }
    }
    let mut response = Response::new(Body::from_stream(receiver_stream(receiver, client)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    response
}

/// `POST /v1/chat/completions` on the controller: routed to a worker serving `model`, its reply
/// (JSON or event stream) passed through as it comes.
pub async fn route_chat_completions(controller: Controller, body: Result<Json<Value>, JsonRejection>) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return rejected(&rejection),
    };
    let Some(model) = body.get("model").and_then(Value::as_str).map(str::to_string) else {
        return invalid("`model` is required to route the request to a worker");
    };
    let Some(worker) = controller.worker_for(&model) else {
        return openai_error(
            StatusCode::NOT_FOUND,
            &format!("no worker serves model `{}`", loggable(&model)),
            "invalid_request_error",
            Some("model_not_found"),
        );
    };
    let reply = controller.post(format!("{worker}/v1/chat/completions")).json(&body).send().await;
    match reply {
        Ok(reply) => {
            let status = StatusCode::from_u16(reply.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = reply.headers().get(reqwest::header::CONTENT_TYPE).cloned();
            let mut response = Response::new(Body::from_stream(reply.bytes_stream()));
            *response.status_mut() = status;
            if let Some(value) = content_type.and_then(|v| header::HeaderValue::from_bytes(v.as_bytes()).ok()) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            response
        }
        Err(e) => {
            // The client learns which model failed; the worker's address and the cause go to the log.
            tracing::warn!(worker = loggable(&worker), model = loggable(&model), error = %e, "worker unreachable");
            openai_error(
                StatusCode::BAD_GATEWAY,
                &format!("the worker serving model `{}` is unreachable", loggable(&model)),
                "server_error",
                None,
            )
        }
    }
}

/// The OpenAI-compatible API on a worker: its one model, answered by its engine.
pub fn worker_routes(worker: Worker) -> Router {
    Router::new()
        .route("/v1/models", get(|State(w): State<Worker>| async move { models_reply(&[w.model_name().to_string()]) }))
        .route(
            "/v1/chat/completions",
            post(|State(w): State<Worker>, body| async move {
                let image_urls = w.image_fetching();
                chat_completions(w, image_urls, body).await
            }),
        )
        .with_state(worker)
}

/// The OpenAI-compatible API on the controller: every registered model, each request routed to a
/// worker of the `model` it names.
pub fn controller_routes(controller: Controller) -> Router {
    Router::new()
        .route("/v1/models", get(|State(c): State<Controller>| async move { models_reply(&c.list_models()) }))
        .route("/v1/chat/completions", post(|State(c): State<Controller>, body| route_chat_completions(c, body)))
        .with_state(controller)
}
