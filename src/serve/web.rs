//! `arcana-serve web`: the chat page of the release's `gradio_web_server.py`, as plain HTML/CSS/JS
//! embedded in the binary (no CDN, works offline), and the small JSON API the page calls. The Rust
//! side talks to the controller exactly as the release's web server does (`/refresh_all_workers` and
//! `/list_models` for the model list; `/get_worker_address`, then the worker's
//! `/worker_generate_stream`), and writes the release's conversation logs.
//!
//! The page keeps the conversation and sends it whole with each request, so the server holds no
//! per-client state. Answers stream to the page as JSON lines:
//! `{"type":"start",...}`, then `{"type":"text","text":...}` (cumulative, as the worker's), then
//! `{"type":"done",...}` or `{"type":"error","message":...}`.
//!
//! Deviations from the release, on purpose: errors say what happened (the worker's error text, "no
//! worker serves model X", "worker at URL unreachable", a timeout with its length) instead of one
//! "NETWORK ERROR DUE TO HIGH TRAFFIC" text; an empty model list is explained and re-fetched until a
//! worker registers; `?model=` also works with `--model-list-mode reload`; the stop string follows the
//! release's web server (`sep` for Single/Mpt, `sep2` otherwise).
use crate::prompt::conversation::{strip_python_whitespace, template_by_name, Conversation, SeparatorStyle};
use crate::serve::http::{json_error, loggable, read_json, read_limited, Access, JsonBody};
use crate::serve::protocol::{error_code, ChunkSplitter, ModelList, ModelQuery, StreamChunk, WorkerAddress};
use crate::vision::decode::{decode_rgb, PixelLimit};
use crate::vision::resample::resize_bicubic;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Semaphore};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// The release's hard cut-offs for a message, without and with an image (characters).
pub const MAX_TEXT_CHARS: usize = 1536;
pub const MAX_TEXT_CHARS_WITH_IMAGE: usize = 1200;
/// The release's limits before an image is sent: longest side, then shortest side.
pub const MAX_IMAGE_LONG_SIDE: u32 = 1344;
pub const MAX_IMAGE_SHORT_SIDE: u32 = 672;
/// expand2square's background (the CLIP mean as bytes).
pub const PAD_BACKGROUND: [u8; 3] = [122, 116, 104];
/// How long the controller may take to answer a list or address query.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(10);
/// The release's connect timeout to a worker.
const WORKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pictures shown as examples, drawn at start-up (the release's photos are not shipped here).
pub const EXAMPLES: [(&str, &str); 2] = [
    ("extreme_ironing", "What is unusual about this image?"),
    ("waterview", "What are the things I should be cautious about when I visit here?"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelListMode {
    /// Fetched at start-up (and again while it is empty).
    Once,
    /// Fetched on each page load.
    Reload,
}

impl std::str::FromStr for ModelListMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "once" => Ok(Self::Once),
            "reload" => Ok(Self::Reload),
            other => Err(format!("unknown model list mode `{other}` (once, reload)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WebConfig {
    pub controller_url: String,
    /// Answers streaming at once; more wait their turn.
    pub concurrency_count: usize,
    pub model_list_mode: ModelListMode,
    /// Hides the title and the terms, for embedding the page.
    pub embed: bool,
    /// Where `YYYY-MM-DD-conv.json` and `serve_images/` go.
    pub log_dir: PathBuf,
    /// Longest wait for the worker's next chunk.
    pub stream_timeout: Duration,
    /// The deployment's key: the page's API needs it, and it goes with every call to the controller
    /// and the workers.
    pub access: Access,
    /// Uploads with more pixels, or a larger padded square in Pad mode, are refused before decoding.
    pub max_image_pixels: u64,
}

#[derive(Clone)]
pub struct WebServer {
    inner: Arc<Inner>,
}

struct Inner {
    config: WebConfig,
    client: reqwest::Client,
    models: Mutex<Vec<String>>,
    answering: Semaphore,
    examples: Vec<Vec<u8>>,
    /// One log line is written whole before the next starts.
    log: Mutex<()>,
}

/// Preprocessing of a non-square image (the release's radio button).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum ImageMode {
    Crop,
    Resize,
    Pad,
    #[default]
    Default,
}

/// One exchange as the page keeps it: the user's text and the reply (`null` for the one to write).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Exchange(pub String, pub Option<String>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    /// The template the first answer used (the release keeps it for the whole conversation).
    #[serde(default)]
    pub template: Option<String>,
    pub messages: Vec<Exchange>,
    /// The last user text was just typed: cut it and add the image marker as the release's `add_text`.
    #[serde(default)]
    pub new_message: bool,
    /// The conversation's image (base64, or a `data:` URL), attached to the first message.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub image_process_mode: ImageMode,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
}

fn default_temperature() -> f64 {
    0.2
}
fn default_top_p() -> f64 {
    0.7
}
fn default_max_new_tokens() -> u32 {
    512
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoteRequest {
    #[serde(rename = "type")]
    pub kind: String,
    pub model: String,
    pub template: String,
    pub messages: Vec<Exchange>,
    #[serde(default)]
    pub has_image: bool,
}

impl WebServer {
    pub fn new(mut config: WebConfig) -> Self {
        config.controller_url = config.controller_url.trim_end_matches('/').to_string();
        let client = reqwest::Client::builder().connect_timeout(WORKER_CONNECT_TIMEOUT).build().unwrap_or_default();
        let answering = Semaphore::new(config.concurrency_count.max(1));
        let examples = EXAMPLES.iter().map(|(name, _)| encode_png(&draw_example(name))).collect();
        let log = Mutex::new(());
        Self { inner: Arc::new(Inner { config, client, models: Mutex::new(Vec::new()), answering, examples, log }) }
    }

    pub fn config(&self) -> &WebConfig {
        &self.inner.config
    }

    /// A POST to the controller or a worker, with the deployment's key.
    fn post(&self, url: String) -> reqwest::RequestBuilder {
        self.inner.config.access.authorize(self.inner.client.post(url))
    }

    /// The release's `get_model_list`: refresh the workers, then list and sort the models.
    pub async fn fetch_models(&self) -> Result<Vec<String>, String> {
        let url = &self.inner.config.controller_url;
        let unreachable = |e: reqwest::Error| format!("the controller at {url} is unreachable: {e}");
        self.post(format!("{url}/refresh_all_workers"))
            .timeout(CONTROLLER_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        let reply =
            self.post(format!("{url}/list_models")).timeout(CONTROLLER_TIMEOUT).send().await.map_err(unreachable)?;
        if !reply.status().is_success() {
            return Err(format!("the controller at {url} refused the model list: HTTP {}", reply.status()));
        }
        let mut models = read_json::<ModelList>(reply)
            .await
            .map_err(|e| format!("the controller at {url} sent a model list that cannot be used: {e}"))?
            .models;
        models.sort();
        if let Ok(mut cached) = self.inner.models.lock() {
            cached.clone_from(&models);
        }
        Ok(models)
    }

    fn cached_models(&self) -> Vec<String> {
        self.inner.models.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The page, its files and the API.
pub fn router(server: WebServer) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }))
        .route("/examples/:name", get(example_image))
        .route("/api/models", get(models))
        .route("/api/chat", post(chat))
        .route("/api/vote", post(vote))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "no such page") })
        .with_state(server)
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML)
}

async fn example_image(State(server): State<WebServer>, UrlPath(name): UrlPath<String>) -> Response {
    let stem = name.strip_suffix(".png").unwrap_or(&name);
    match EXAMPLES.iter().position(|(example, _)| *example == stem) {
        Some(i) => ([(header::CONTENT_TYPE, "image/png")], server.inner.examples[i].clone()).into_response(),
        None => json_error(StatusCode::NOT_FOUND, &format!("no example named `{name}`")),
    }
}

/// `{models, error?, notice?, ...}`: the list plus, when it is empty or failed, why.
async fn models(State(server): State<WebServer>) -> Json<Value> {
    let config = server.config();
    let cached = server.cached_models();
    // Once: the start-up list, fetched again while it is empty (a worker may have finished loading).
    let fetched = if config.model_list_mode == ModelListMode::Once && !cached.is_empty() {
        Ok(cached)
    } else {
        server.fetch_models().await
    };
    let examples: Vec<Value> = EXAMPLES
        .iter()
        .map(|(name, question)| json!({"image": format!("/examples/{name}.png"), "question": question}))
        .collect();
    let mut reply = json!({
        "mode": match config.model_list_mode { ModelListMode::Once => "once", ModelListMode::Reload => "reload" },
        "embed": config.embed,
        "controller": config.controller_url,
        "examples": examples,
        "max_text_chars": MAX_TEXT_CHARS,
        "max_text_chars_with_image": MAX_TEXT_CHARS_WITH_IMAGE,
    });
    match fetched {
        Ok(list) => {
            if list.is_empty() {
                reply["notice"] = json!(format!(
                    "No model is available yet: the controller at {} lists no worker. A worker registers once \
                     its model has loaded; this list is fetched again every few seconds.",
                    config.controller_url
                ));
            }
            reply["models"] = json!(list);
        }
        Err(e) => {
            reply["models"] = json!([]);
            reply["error"] = json!(e);
        }
    }
    Json(reply)
}

/// The release's `add_text` cut-offs: 1536 characters, 1200 with an image, which then gets its marker.
pub fn cut_user_text(text: &str, with_image: bool) -> String {
    let limit = if with_image { MAX_TEXT_CHARS_WITH_IMAGE } else { MAX_TEXT_CHARS };
    let mut cut: String = text.chars().take(limit).collect();
    if with_image && !cut.contains("<image>") {
        cut.push_str("\n<image>");
    }
    cut
}

/// The release's web server's template choice for a first answer (it differs from the CLI's: without
/// "llava" in the name the text-only templates are used).
pub fn web_template_for_model_name(model_name: &str) -> &'static str {
    let name = model_name.to_lowercase();
    let plain_not_finetune = name.contains("plain") && !name.contains("finetune");
    if name.contains("llava") {
        if name.contains("llama-2") {
            "llava_llama_2"
        } else if name.contains("mistral") || name.contains("mixtral") {
            if name.contains("orca") {
                "mistral_orca"
            } else if name.contains("hermes") {
                "chatml_direct"
            } else {
                "mistral_instruct"
            }
        } else if name.contains("llava-v1.6-34b") {
            "chatml_direct"
        } else if name.contains("v1") {
            if name.contains("mmtag") || plain_not_finetune {
                "v1_mmtag"
            } else {
                "llava_v1"
            }
        } else if name.contains("mpt") {
            "mpt"
        } else if name.contains("mmtag") || plain_not_finetune {
            "v0_mmtag"
        } else {
            "llava_v0"
        }
    } else if model_name.contains("mpt") {
        "mpt_text"
    } else if model_name.contains("llama-2") {
        "llama_2"
    } else {
        "vicuna_v1"
    }
}

/// The web server's stop string: `sep` for Single and Mpt, `sep2` otherwise.
pub fn web_stop_string(conversation: &Conversation) -> Option<String> {
    match conversation.sep_style {
        SeparatorStyle::Single | SeparatorStyle::Mpt => Some(conversation.sep.clone()),
        _ => conversation.sep2.clone(),
    }
}

/// The conversation for `template` with the exchanges appended (image on the first user message).
pub fn build_conversation(template: &str, exchanges: &[Exchange], has_image: bool) -> Result<Conversation, String> {
    let mut conversation =
        template_by_name(template).map_err(|e| format!("template `{template}` is not available: {e}"))?;
    let [user, assistant] = conversation.roles.clone();
    for (i, Exchange(question, answer)) in exchanges.iter().enumerate() {
        if i == 0 && has_image {
            conversation.append_message_with_image(&user, question);
        } else {
            conversation.append_message(&user, Some(question));
        }
        conversation.append_message(&assistant, answer.as_deref());
    }
    Ok(conversation)
}

/// The release's `Conversation.dict()` as logged: messages as `[role, text]`, the template's offset.
pub fn state_dict(template: &str, conversation: &Conversation) -> Value {
    let offset = template_by_name(template).map(|t| t.messages.len()).unwrap_or(0);
    let messages: Vec<Value> = conversation.messages.iter().map(|m| json!([m.role, m.text])).collect();
    json!({
        "system": conversation.system,
        "roles": conversation.roles,
        "messages": messages,
        "offset": offset,
        "sep": conversation.sep,
        "sep2": conversation.sep2,
    })
}

/// The image as the release sends it: Pad squares it on the background colour, Resize makes it
/// 336x336, Crop and Default leave it (the worker's processor crops); then, when the longest side is
/// over 1344, it shrinks so that the longest side is <= 1344 and the shortest <= 672.
pub fn process_image(image: &RgbImage, mode: ImageMode) -> RgbImage {
    let shaped = match mode {
        ImageMode::Pad => expand_to_square(image),
        ImageMode::Resize => resize_bicubic(image, 336, 336),
        ImageMode::Crop | ImageMode::Default => image.clone(),
    };
    match shrunk_size(shaped.width(), shaped.height()) {
        Some((width, height)) => resize_bicubic(&shaped, width, height),
        None => shaped,
    }
}

/// The release's `expand2square`: the image centred on a square of `PAD_BACKGROUND`.
pub fn expand_to_square(image: &RgbImage) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == height {
        return image.clone();
    }
    let side = width.max(height);
    let mut square = RgbImage::from_pixel(side, side, image::Rgb(PAD_BACKGROUND));
    let (left, top) = ((side - width) / 2, (side - height) / 2);
    image::imageops::replace(&mut square, image, i64::from(left), i64::from(top));
    square
}

/// The size the release shrinks an image to before sending it, or `None` when it is small enough.
pub fn shrunk_size(width: u32, height: u32) -> Option<(u32, u32)> {
    let (long, short) = (width.max(height), width.min(height));
    if long <= MAX_IMAGE_LONG_SIDE || short == 0 {
        return None;
    }
    let aspect = f64::from(long) / f64::from(short);
    let shortest =
        (f64::from(MAX_IMAGE_LONG_SIDE) / aspect).min(f64::from(MAX_IMAGE_SHORT_SIDE)).min(f64::from(short)) as u32;
    let longest = (f64::from(shortest) * aspect) as u32;
    Some(if height > width { (shortest, longest) } else { (longest, shortest) })
}

/// The base64 payload of a `data:` URL, or the text itself.
fn base64_payload(text: &str) -> &str {
    match text.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map_or(rest, |(_, payload)| payload),
        None => text,
    }
}

/// Decodes an uploaded image as Pillow would; one with more than `max_pixels` pixels, or whose square
/// is larger when `mode` pads it, is refused from its header before anything is decoded or allocated.
/// The error names the problem.
pub fn decode_upload(text: &str, mode: ImageMode, max_pixels: u64) -> Result<RgbImage, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_payload(text).trim())
        .map_err(|e| format!("the image is not valid base64: {e}"))?;
    let limit = match mode {
        ImageMode::Pad => PixelLimit::padded(max_pixels),
        ImageMode::Resize | ImageMode::Crop | ImageMode::Default => PixelLimit::decoded(max_pixels),
    };
    decode_rgb(&bytes, std::path::Path::new("upload"), limit).map_err(|e| match e {
        crate::Error::Image { message, .. } => format!("the image cannot be used: {message}"),
        other => format!("the image cannot be used: {other}"),
    })
}

pub fn encode_png(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageOutputFormat::Png);
    bytes
}

/// md5 of the raw RGB bytes (PIL's `image.tobytes()`), as the release names saved images.
pub fn image_md5(image: &RgbImage) -> String {
    use md5::{Digest, Md5};
    Md5::digest(image.as_raw()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Today's local date as the release writes it in log names (YYYY-MM-DD).
pub fn local_date() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as libc::time_t;
    // SAFETY: localtime_r only reads `now` and writes into `tm`, both owned here.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !converted {
        return "1970-01-01".into();
    }
    format!("{:04}-{:02}-{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday)
}

fn unix_seconds() -> f64 {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    (seconds * 1e4).round() / 1e4
}

impl WebServer {
    fn append_log(&self, line: &Value) {
        let dir = &self.inner.config.log_dir;
        let path = dir.join(format!("{}-conv.json", local_date()));
        // The whole line in one write, one writer at a time: lines of concurrent answers never mix.
        let mut text = line.to_string();
        text.push('\n');
        let _one_writer = self.inner.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let written = std::fs::create_dir_all(dir).and_then(|_| {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            file.write_all(text.as_bytes())
        });
        if let Err(e) = written {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    /// Saves `image` as `serve_images/YYYY-MM-DD/<md5>.jpg` unless it is there already.
    fn save_image(&self, image: &RgbImage, md5: &str) {
        let dir = self.inner.config.log_dir.join("serve_images").join(local_date());
        let path = dir.join(format!("{md5}.jpg"));
        if path.is_file() {
            return;
        }
        if let Err(e) = std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|_| image.save_with_format(&path, image::ImageFormat::Jpeg).map_err(|e| e.to_string()))
        {
            tracing::warn!("saving {}: {e}", path.display());
        }
    }
}

/// Everything a chat request needs, checked before any answer streams.
struct PreparedChat {
    model: String,
    template: String,
    conversation: Conversation,
    user_text: String,
    prompt: String,
    stop: Option<String>,
    images_base64: Vec<String>,
    image_hashes: Vec<String>,
    temperature: f64,
    top_p: f64,
    max_new_tokens: u32,
}

fn prepare_chat(server: &WebServer, mut request: ChatRequest) -> Result<PreparedChat, String> {
    if request.model.is_empty() {
        return Err("choose a model first".into());
    }
    if !(0.0..=1.0).contains(&request.temperature) || !(0.0..=1.0).contains(&request.top_p) {
        return Err("temperature and top_p must lie in 0..1".into());
    }
    let has_image = request.image.is_some();
    let first_of_conversation = request.messages.len() == 1;
    let Some(last) = request.messages.last_mut() else {
        return Err("`messages` is empty: there is nothing to answer".into());
    };
    last.1 = None;
    if request.new_message {
        if last.0.is_empty() && !has_image {
            return Err("the message is empty".into());
        }
        last.0 = cut_user_text(&last.0, has_image && first_of_conversation);
    }
    let user_text = request.messages.last().map(|m| m.0.clone()).unwrap_or_default();
    let template = match request.template.take() {
        Some(name) if template_by_name(&name).is_ok() => name,
        _ => web_template_for_model_name(&request.model).to_string(),
    };
    let conversation = build_conversation(&template, &request.messages, has_image)?;
    let prompt = conversation.get_prompt().map_err(|e| e.to_string())?;
    let stop = web_stop_string(&conversation);
    let (mut images_base64, mut image_hashes) = (Vec::new(), Vec::new());
    if let Some(upload) = &request.image {
        let mode = request.image_process_mode;
        let processed = process_image(&decode_upload(upload, mode, server.inner.config.max_image_pixels)?, mode);
        let md5 = image_md5(&processed);
        server.save_image(&processed, &md5);
        images_base64.push(base64::engine::general_purpose::STANDARD.encode(encode_png(&processed)));
        image_hashes.push(md5);
    }
    Ok(PreparedChat {
        model: request.model,
        template,
        conversation,
        user_text,
        prompt,
        stop,
        images_base64,
        image_hashes,
        temperature: request.temperature,
        top_p: request.top_p,
        max_new_tokens: request.max_new_tokens.min(1536),
    })
}

fn event_line(event: &Value) -> bytes::Bytes {
    let mut line = event.to_string();
    line.push('\n');
    bytes::Bytes::from(line)
}

async fn chat(
    State(server): State<WebServer>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    JsonBody(request): JsonBody<ChatRequest>,
) -> Response {
    let start = unix_seconds();
    let prepare_server = server.clone();
    let prepared = match tokio::task::spawn_blocking(move || prepare_chat(&prepare_server, request)).await {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(message)) => return json_error(StatusCode::BAD_REQUEST, &message),
        Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("preparing the request failed: {e}")),
    };
    let (sender, receiver) = mpsc::channel::<bytes::Bytes>(16);
    tokio::spawn(async move {
        let ip = client.ip().to_string();
        answer(server, prepared, sender, start, ip).await;
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|line| (Ok::<_, std::convert::Infallible>(line), receiver))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))
}

/// Streams one answer to `sender`; logs it as the release does when it completes.
async fn answer(server: WebServer, mut chat: PreparedChat, sender: mpsc::Sender<bytes::Bytes>, start: f64, ip: String) {
    let send = |event: Value| {
        let sender = sender.clone();
        async move { sender.send(event_line(&event)).await.is_ok() }
    };
    let started =
        json!({"type": "start", "user": chat.user_text, "template": chat.template, "images": chat.image_hashes});
    if !send(started).await {
        return;
    }
    // A page that leaves while waiting for its turn gives the turn up.
    let _slot = tokio::select! {
        slot = server.inner.answering.acquire() => match slot {
            Ok(slot) => slot,
            Err(_) => return,
        },
        _ = sender.closed() => return,
    };
    let text = match stream_from_worker(&server, &chat, &sender).await {
        Ok(text) => text,
        Err(message) => {
            tracing::warn!(model = loggable(&chat.model), error = loggable(&message), "answer failed");
            send(json!({"type": "error", "message": message})).await;
            return;
        }
    };
    let _ = chat.conversation.set_last_message_text(&text);
    let finish = unix_seconds();
    send(json!({"type": "done", "text": text})).await;
    server.append_log(&json!({
        "tstamp": finish,
        "type": "chat",
        "model": chat.model,
        "start": start,
        "finish": finish,
        "state": state_dict(&chat.template, &chat.conversation),
        "images": chat.image_hashes,
        "ip": ip,
    }));
}

/// Asks the controller for a worker and relays its stream; returns the final answer or why it failed.
async fn stream_from_worker(
    server: &WebServer,
    chat: &PreparedChat,
    sender: &mpsc::Sender<bytes::Bytes>,
) -> Result<String, String> {
    let config = server.config();
    let controller = &config.controller_url;
    let reply = server
        .post(format!("{controller}/get_worker_address"))
        .timeout(CONTROLLER_TIMEOUT)
        .json(&ModelQuery { model: chat.model.clone() })
        .send()
        .await
        .map_err(|e| format!("the controller at {controller} is unreachable: {e}"))?;
    let address = read_json::<WorkerAddress>(reply)
        .await
        .map_err(|e| format!("the controller at {controller} sent an address that cannot be used: {e}"))?
        .address;
    if address.is_empty() {
        return Err(format!(
            "no worker serves model {} (the controller at {controller} has none registered for it; a worker \
             registers once its model has loaded)",
            chat.model
        ));
    }
    // The page is told which model's worker failed; its address and the cause go to the log.
    let model = loggable(&chat.model);
    let failed = |what: &str, detail: String| {
        tracing::warn!(worker = loggable(&address), model, detail = loggable(&detail), "{what}");
        format!("the worker serving model {model} {what}")
    };
    let payload = json!({
        "model": chat.model,
        "prompt": chat.prompt,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "max_new_tokens": chat.max_new_tokens,
        "stop": chat.stop,
        "images": chat.images_base64,
    });
    let timeout = config.stream_timeout;
    let timed_out = || failed(&format!("sent nothing for {} s", timeout.as_secs()), String::new());
    let response =
        tokio::time::timeout(timeout, server.post(format!("{address}/worker_generate_stream")).json(&payload).send())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| failed("is unreachable", e.to_string()))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = read_limited(response, 4096).await.unwrap_or_default();
        return Err(failed(&format!("answered {status}"), String::from_utf8_lossy(&body).into_owned()));
    }
    let mut body = response;
    let mut splitter = ChunkSplitter::default();
    let mut output = String::new();
    loop {
        let bytes = match tokio::time::timeout(timeout, body.chunk()).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => return Err(failed("broke off its stream", e.to_string())),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(bytes))) => bytes,
        };
        let chunks = splitter.push(&bytes);
        if splitter.overflowed() {
            return Err(failed("sent a chunk that is too long", String::new()));
        }
        for raw in chunks {
            let chunk: StreamChunk =
                serde_json::from_slice(&raw).map_err(|e| failed("sent a chunk that does not parse", e.to_string()))?;
            if chunk.error_code != error_code::OK {
                return Err(describe_error_chunk(&chunk, &chat.model));
            }
            output = answer_part(&chunk.text, &chat.prompt);
            if sender.send(event_line(&json!({"type": "text", "text": output}))).await.is_err() {
                // The page left; dropping the response frees the worker's slot.
                return Err("the page closed the connection".into());
            }
        }
    }
    if !splitter.remainder().is_empty() {
        return Err(failed("ended its stream mid-chunk", String::new()));
    }
    Ok(output)
}

/// The reply part of a cumulative worker text, stripped as the release does.
fn answer_part(text: &str, prompt: &str) -> String {
    let rest = match text.strip_prefix(prompt) {
        Some(rest) => rest.to_string(),
        None => text.chars().skip(prompt.chars().count()).collect(),
    };
    strip_python_whitespace(&rest).to_string()
}

fn describe_error_chunk(chunk: &StreamChunk, model: &str) -> String {
    match chunk.error_code {
        error_code::NO_WORKER => format!("no worker serves model {model}: {} (error_code 2)", chunk.text),
        error_code::WORKER_UNREACHABLE => {
            format!("the worker serving model {model} is unreachable: {} (error_code 3)", chunk.text)
        }
        code => format!("the worker serving model {model} failed: {} (error_code {code})", chunk.text),
    }
}

/// Paths of the page served without the API key: the page itself, its files and the health check
/// (the page asks for the key before it calls the API).
pub fn is_public_path(path: &str) -> bool {
    matches!(path, "/" | "/app.js" | "/style.css" | "/health") || path.starts_with("/examples/")
}

async fn vote(
    State(server): State<WebServer>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    JsonBody(request): JsonBody<VoteRequest>,
) -> Response {
    if !["upvote", "downvote", "flag"].contains(&request.kind.as_str()) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("unknown vote `{}` (upvote, downvote, flag)", request.kind),
        );
    }
    let conversation = match build_conversation(&request.template, &request.messages, request.has_image) {
        Ok(conversation) => conversation,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, &message),
    };
    server.append_log(&json!({
        "tstamp": unix_seconds(),
        "type": request.kind,
        "model": request.model,
        "state": state_dict(&request.template, &conversation),
        "ip": client.ip().to_string(),
    }));
    Json(json!({"ok": true})).into_response()
}

/// The example pictures, drawn: a figure ironing on the back of a yellow taxi in a street, and a
/// wooden pier on a lake before mountains. Small, so that they travel fast; not photos.
pub fn draw_example(name: &str) -> RgbImage {
    let (width, height) = (320u32, 240u32);
    let mut image = RgbImage::new(width, height);
    let fill = |image: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, colour: [u8; 3]| {
        for y in y0..y1.min(height) {
            for x in x0..x1.min(width) {
                image.put_pixel(x, y, image::Rgb(colour));
            }
        }
    };
    if name == "extreme_ironing" {
        fill(&mut image, 0, 0, width, 150, [150, 160, 170]); // buildings
        for i in 0..6 {
            fill(&mut image, 10 + i * 52, 20, 40 + i * 52, 60, [90, 100, 120]); // windows
        }
        fill(&mut image, 0, 150, width, height, [70, 70, 75]); // road
        fill(&mut image, 60, 130, 260, 190, [235, 190, 30]); // taxi body
        fill(&mut image, 100, 105, 220, 132, [230, 185, 25]); // taxi roof
        fill(&mut image, 80, 185, 110, 205, [20, 20, 20]); // wheels
        fill(&mut image, 210, 185, 240, 205, [20, 20, 20]);
        fill(&mut image, 150, 85, 230, 92, [60, 90, 200]); // ironing board
        fill(&mut image, 175, 50, 190, 85, [200, 60, 40]); // person
        fill(&mut image, 176, 36, 189, 50, [230, 190, 160]);
        fill(&mut image, 195, 80, 210, 85, [240, 240, 240]); // iron
    } else {
        for y in 0..110 {
            let shade = 150 + (y as u8) / 2;
            fill(&mut image, 0, y, width, y + 1, [shade.saturating_sub(40), shade, 235]);
            // sky
        }
        for x in 0..width {
            let peak = 60 + ((x as f32 / 25.0).sin().abs() * 40.0) as u32;
            fill(&mut image, x, peak, x + 1, 110, [80, 100, 90]); // mountains
        }
        fill(&mut image, 0, 110, width, height, [40, 90, 140]); // lake
        fill(&mut image, 140, 140, 180, height, [130, 95, 60]); // pier
        for y in (145..height).step_by(12) {
            fill(&mut image, 140, y, 180, y + 2, [100, 70, 45]);
        }
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::decode::DEFAULT_MAX_PIXELS;

    #[test]
    fn text_is_cut_as_the_release_does() {
        let long = "a".repeat(2000);
        assert_eq!(cut_user_text(&long, false).len(), 1536);
        let with_image = cut_user_text(&long, true);
        assert_eq!(with_image, format!("{}\n<image>", "a".repeat(1200)));
        assert_eq!(cut_user_text("<image> what?", true), "<image> what?");
        assert_eq!(cut_user_text("é".repeat(1600).as_str(), false).chars().count(), 1536);
    }

    #[test]
    fn templates_follow_the_web_server() {
        assert_eq!(web_template_for_model_name("arcana-cli-tiny-v1"), "vicuna_v1");
        assert_eq!(web_template_for_model_name("llava-v1.5-7b"), "llava_v1");
        assert_eq!(web_template_for_model_name("llava-v1.6-mistral-7b"), "mistral_instruct");
        assert_eq!(web_template_for_model_name("llava-v1.6-34b"), "chatml_direct");
        assert_eq!(web_template_for_model_name("llava-llama-2-13b"), "llava_llama_2");
        assert_eq!(web_template_for_model_name("llava-7b-plain"), "v0_mmtag");
        assert_eq!(web_template_for_model_name("llava-7b"), "llava_v0");
        assert_eq!(web_template_for_model_name("llama-2-7b"), "llama_2");
    }

    #[test]
    fn images_shrink_like_the_release() {
        assert_eq!(shrunk_size(1344, 1000), None);
        // 2000x1000: aspect 2, shortest = min(672, 672, 1000) = 672, longest 1344.
        assert_eq!(shrunk_size(2000, 1000), Some((1344, 672)));
        // 1000x3000 (portrait): shortest = int(min(448, 672, 1000)) = 448, longest = 1344.
        assert_eq!(shrunk_size(1000, 3000), Some((448, 1344)));
        let wide = RgbImage::from_pixel(40, 20, image::Rgb([1, 2, 3]));
        let padded = process_image(&wide, ImageMode::Pad);
        assert_eq!(padded.dimensions(), (40, 40));
        assert_eq!(padded.get_pixel(0, 0).0, PAD_BACKGROUND);
        assert_eq!(padded.get_pixel(0, 10).0, [1, 2, 3]);
        assert_eq!(process_image(&wide, ImageMode::Resize).dimensions(), (336, 336));
        assert_eq!(process_image(&wide, ImageMode::Default).dimensions(), (40, 20));
    }

    #[test]
    fn md5_names_the_raw_pixels() {
        // md5 of the 3 bytes 00 00 00.
        let black = RgbImage::new(1, 1);
        assert_eq!(image_md5(&black), "693e9af84d3dfcc71e640e005bdc5e2e");
    }

    #[test]
    fn the_state_is_the_release_dict() {
        let exchanges = vec![Exchange("What?\n<image>".into(), Some("A taxi.".into()))];
        let conversation = build_conversation("vicuna_v1", &exchanges, true).unwrap();
        let state = state_dict("vicuna_v1", &conversation);
        assert_eq!(state["messages"], json!([["USER", "What?\n<image>"], ["ASSISTANT", "A taxi."]]));
        assert_eq!(state["offset"], 0);
        assert_eq!(state["sep2"], "</s>");
        let prompt = conversation.get_prompt().unwrap();
        assert!(prompt.contains("USER: <image>\nWhat? ASSISTANT: A taxi.</s>"), "{prompt}");
        assert_eq!(web_stop_string(&conversation).as_deref(), Some("</s>"));
    }

    #[test]
    fn uploads_decode_from_data_urls() {
        let png = encode_png(&draw_example("waterview"));
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
        let decode = |text: &str| decode_upload(text, ImageMode::Default, DEFAULT_MAX_PIXELS);
        assert_eq!(decode(&url).unwrap().dimensions(), (320, 240));
        assert!(decode("data:image/png;base64,%%%").unwrap_err().contains("base64"));
        assert!(decode("aGVsbG8=").unwrap_err().contains("not a recognised image format"));
    }

    #[test]
    fn uploads_over_the_pixel_limit_are_refused_before_decoding() {
        // 3000x2: 6000 pixels, but 9000000 once padded to a square.
        let png = encode_png(&RgbImage::new(3000, 2));
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
        assert_eq!(decode_upload(&url, ImageMode::Default, 10_000).unwrap().dimensions(), (3000, 2));
        let padded = decode_upload(&url, ImageMode::Pad, 10_000).unwrap_err();
        assert!(padded.contains("3000x3000 = 9000000 pixels") && padded.contains("limit of 10000 pixels"), "{padded}");
        let decoded = decode_upload(&url, ImageMode::Crop, 5_000).unwrap_err();
        assert!(decoded.contains("6000 pixels") && decoded.contains("limit of 5000 pixels"), "{decoded}");
    }
}
