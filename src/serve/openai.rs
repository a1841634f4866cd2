//! An OpenAI-compatible API on the worker (`GET /v1/models`, `POST /v1/chat/completions` and the raw-prompt
//! `POST /v1/completions`, streamed as server-sent events or not) and, routed by `model`, through the
//! controller. Messages are rendered
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

/// `POST /v1/completions`: a raw prompt, continued as it is (no template), text only.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<usize>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    /// This server's extension, as on chat completions.
    pub response_format: Option<ResponseFormat>,
    /// Each token's log-probability with this many alternatives (the legacy API's integer).
    pub logprobs: Option<usize>,
}

/// The legacy API's prompt: a string, or a list of prompts (one is served).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
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
    let logprobs = match (body.logprobs.unwrap_or(false), body.top_logprobs) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(_)) => return Err("`top_logprobs` needs `logprobs: true`".into()),
        (false, None) => None,
    };
    let sampling = Sampling {
        temperature: body.temperature,
        top_p: body.top_p,
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        stop: body.stop.as_ref(),
        seed: body.seed,
        response_format: body.response_format.as_ref(),
        logprobs,
    };
    let params = sampling.params(limits, GenerationParams::default().max_new_tokens)?;
    let request = Request { input: RequestInput::Conversation(messages), images: Vec::new(), params };
    Ok((request, images))
}

/// The sampling fields both generation endpoints share.
struct Sampling<'a> {
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<usize>,
    stop: Option<&'a StopField>,
    seed: Option<u64>,
    response_format: Option<&'a ResponseFormat>,
    /// Alternatives per token when log-probabilities are asked for.
    logprobs: Option<usize>,
}

impl Sampling<'_> {
    /// The generation parameters, checked against `limits`; `max_tokens` defaults to `default_max`.
    fn params(&self, limits: &RequestLimits, default_max: usize) -> Result<GenerationParams, String> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!("`temperature` must be within [0, 2], got {temperature}"));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        limits.check_stop(&stop)?;
        let constraint = self.response_format.and_then(ResponseFormat::constraint);
        if let Some(constraint) = &constraint {
            limits.check_constraint(constraint)?;
        }
        if let Some(top) = self.logprobs {
            limits.check_top_logprobs(top)?;
        }
        let params = GenerationParams {
            temperature,
            top_p: Some(self.top_p.unwrap_or(1.0)),
            top_k: Some(0),
            max_new_tokens: self.max_tokens.unwrap_or(default_max),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            seed: self.seed,
            logprobs: self.logprobs,
            constraint,
        };
        params.check().map_err(|e| e.to_string())?;
        Ok(params)
    }
}

/// OpenAI's default `max_tokens` for `/v1/completions`.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// The engine request of a text completion: the prompt as given, continued without a template.
fn completion_request(body: &CompletionRequest, limits: &RequestLimits) -> Result<Request, String> {
    if body.n.is_some_and(|n| n != 1) || body.best_of.is_some_and(|n| n != 1) {
        return Err("only n = 1 and best_of = 1 are supported".into());
    }
    if body.echo {
        return Err("`echo` is not supported".into());
    }
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err("`suffix` is not supported".into());
    }
    let prompt = match &body.prompt {
        PromptField::One(prompt) => prompt.clone(),
        PromptField::Many(prompts) if prompts.len() == 1 => prompts[0].clone(),
        PromptField::Many(prompts) => return Err(format!("one prompt per request, got {}", prompts.len())),
    };
    if prompt.is_empty() {
        return Err("`prompt` is empty".into());
    }
    let sampling = Sampling {
        temperature: body.temperature,
        top_p: body.top_p,
        max_tokens: body.max_tokens,
        stop: body.stop.as_ref(),
        seed: body.seed,
        response_format: body.response_format.as_ref(),
        logprobs: body.logprobs,
    };
    let params = sampling.params(limits, COMPLETIONS_DEFAULT_MAX_TOKENS)?;
    Ok(Request { input: RequestInput::Prompt(prompt), images: Vec::new(), params })
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

/// OpenAI's finish reasons; an answer whose constraint allowed no further token is this server's own
/// `no_allowed_token`.
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled | FinishReason::Complete => "stop",
        FinishReason::NoAllowedToken => "no_allowed_token",
    }
}

/// Which of OpenAI's generation endpoints an answer goes out as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/v1/chat/completions`: `message`/`delta` with `content`, `logprobs.content`.
    Chat,
    /// `/v1/completions`: `text`, the legacy `logprobs` (`tokens`, `token_logprobs`, ...).
    Text,
}

impl Endpoint {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Text, _) => "text_completion",
        }
    }

    fn id(self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix = match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Text => "cmpl",
        };
        format!("{prefix}-{:x}{:06x}", now(), NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// A choice carrying `text` (the whole answer, or a streamed piece of it); `logprobs` when asked
    /// for, `offset` the answer's length before `text` (the legacy shape's `text_offset`).
    fn choice(
        self,
        text: &str,
        chunk: bool,
        logprobs: Option<(&[TokenLogprobs], usize)>,
        finish: Option<&str>,
    ) -> Value {
        let mut choice = match (self, chunk) {
            (Endpoint::Chat, false) => json!({"message": {"role": "assistant", "content": text}}),
            (Endpoint::Chat, true) if finish.is_some() && text.is_empty() => json!({"delta": {}}),
            (Endpoint::Chat, true) => json!({"delta": {"content": text}}),
            (Endpoint::Text, _) => json!({"text": text}),
        };
        choice["index"] = json!(0);
        choice["finish_reason"] = json!(finish);
        choice["logprobs"] = match (self, logprobs) {
            (_, None) => Value::Null,
            (Endpoint::Chat, Some((tokens, _))) => logprobs_json(tokens),
            (Endpoint::Text, Some((tokens, offset))) => legacy_logprobs_json(tokens, offset),
        };
        choice
    }
}

/// The legacy API's `logprobs`: parallel lists, alternatives as `{token: logprob}`, each token's byte
/// offset in the answer counted from `offset`.
fn legacy_logprobs_json(tokens: &[TokenLogprobs], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.chosen.token.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.chosen.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.chosen.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
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
           "total_tokens": usage.prompt_tokens + usage.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}})
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
    if let Some(response) = other_model(body.model.as_deref(), &model) {
        return response;
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
    let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let reply = Reply { endpoint: Endpoint::Chat, model, stream: body.stream, include_usage };
    reply.answer(worker, engine, request).await
}

/// `POST /v1/completions` on a worker.
pub async fn completions(worker: Worker, body: Result<Json<CompletionRequest>, JsonRejection>) -> Response {
    worker.count_request();
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return rejected(&rejection),
    };
    let model = worker.model_name().to_string();
    if let Some(response) = other_model(body.model.as_deref(), &model) {
        return response;
    }
    let engine = match worker.ready_engine() {
        Ok(engine) => engine,
        Err(message) => return openai_error(StatusCode::SERVICE_UNAVAILABLE, &message, "server_error", None),
    };
    let request = match completion_request(&body, worker.limits()) {
        Ok(r) => r,
        Err(message) => return invalid(message),
    };
    let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let reply = Reply { endpoint: Endpoint::Text, model, stream: body.stream, include_usage };
    reply.answer(worker, engine, request).await
}

/// A 404 when the request names a model this worker does not serve.
fn other_model(asked: Option<&str>, served: &str) -> Option<Response> {
    let asked = asked.filter(|m| !m.is_empty() && *m != served)?;
    Some(openai_error(
        StatusCode::NOT_FOUND,
        &format!("model `{asked}` is not served here (this worker serves `{served}`)"),
        "invalid_request_error",
        Some("model_not_found"),
    ))
}

/// How an answer goes back to its client.
struct Reply {
    endpoint: Endpoint,
    model: String,
    stream: bool,
    include_usage: bool,
}

impl Reply {
    async fn answer(self, worker: Worker, engine: crate::engine::EngineHandle, request: Request) -> Response {
        if self.stream {
            stream_completion(worker, engine, request, self).await
        } else {
            whole_completion(worker, engine, request, self).await
        }
    }
}

/// The answer's parts as its events come.
type WholeAnswer = (String, Vec<TokenLogprobs>, crate::engine::Finish);

async fn whole_completion(
    worker: Worker,
    engine: crate::engine::EngineHandle,
    request: Request,
    reply: Reply,
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
        Ok(Ok((text, logprobs, finish))) => {
            let logprobs = with_logprobs.then_some((logprobs.as_slice(), 0));
            let choice = reply.endpoint.choice(&text, false, logprobs, Some(finish_reason(finish.reason)));
            Json(json!({
                "id": reply.endpoint.id(),
                "object": reply.endpoint.object(false),
                "created": now(),
                "model": reply.model,
                "choices": [choice],
                "usage": usage_json(finish.usage),
            }))
            .into_response()
        }
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
    reply: Reply,
) -> Response {
    let with_logprobs = request.params.logprobs.is_some();
    let (sender, receiver) = tokio::sync::mpsc::channel::<String>(64);
    // Whether the answer started: a request refused before its first token (a constraint that does not
    // compile, a full context, a bad image) gets an HTTP error instead of an event stream.
    let (started_sender, started) = tokio::sync::oneshot::channel::<Result<(), Error>>();
    let mut started_sender = Some(started_sender);
    let Reply { endpoint, model, include_usage, .. } = reply;
    let (id, created) = (endpoint.id(), now());
    let frame = move |choices: Value, usage: Option<Value>| {
        let mut chunk =
            json!({"id": id, "object": endpoint.object(true), "created": created, "model": model, "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    };
    // Log-probabilities of tokens whose text has not been sent yet: they go with the next text.
    let mut pending = Vec::new();
    // The answer's length so far, for the legacy logprobs' `text_offset`.
    let mut sent = 0;
    let mut text_choice = move |text: &str, pending: &mut Vec<TokenLogprobs>, finish: Option<&str>| {
        let logprobs = std::mem::take(pending);
        let choice = endpoint.choice(text, true, with_logprobs.then_some((logprobs.as_slice(), sent)), finish);
        sent += logprobs.iter().map(|t| t.chosen.token.len()).sum::<usize>();
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
                // A chat stream opens with the assistant's role.
                if endpoint == Endpoint::Chat {
                    let mut role =
                        json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null});
                    if with_logprobs {
                        role["logprobs"] = logprobs_json(&[]);
                    }
                    return sender.blocking_send(frame(json!([role]), None)).is_ok();
                }
                return true;
            }
            let mut frames = Vec::new();
            match event {
                Ok(Event::Text(delta)) => frames.push(frame(text_choice(&delta, &mut pending, None), None)),
                Ok(Event::Logprobs(token)) => pending.push(token),
                Ok(Event::Finished(finish)) => {
                    let reason = finish_reason(finish.reason);
                    frames.push(frame(text_choice("", &mut pending, Some(reason)), None));
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

/// `POST /v1/chat/completions` or `/v1/completions` (`path`) on the controller: routed to a worker
/// serving `model`, its reply (JSON or event stream) passed through as it comes.
pub async fn route_to_worker(
    controller: Controller,
    path: &'static str,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
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
    let reply = controller.post(format!("{worker}{path}")).json(&body).send().await;
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
        .route("/v1/completions", post(|State(w): State<Worker>, body| completions(w, body)))
        .with_state(worker)
}

/// The OpenAI-compatible API on the controller: every registered model, each request routed to a
/// worker of the `model` it names.
pub fn controller_routes(controller: Controller) -> Router {
    Router::new()
        .route("/v1/models", get(|State(c): State<Controller>| async move { models_reply(&c.list_models()) }))
        .route(
            "/v1/chat/completions",
            post(|State(c): State<Controller>, body| route_to_worker(c, "/v1/chat/completions", body)),
        )
        .route("/v1/completions", post(|State(c): State<Controller>, body| route_to_worker(c, "/v1/completions", body)))
        .with_state(controller)
}
