//! `arcana-serve`: the release's serving stack (arcana/serve/*.py) in one binary.
//!
//!     arcana-serve controller [--host 127.0.0.1] [--port 21001] [--dispatch-method shortest_queue|lottery]
//!     arcana-serve worker --model-path DIR [--port 21002] [--controller-address http://localhost:21001]
//!     arcana-serve web [--port 7860] [--controller-url http://localhost:21001] [--log-dir .]
//!     arcana-serve all --model-path DIR [--port 7860]    (controller + worker + web in one process)
use anyhow::{bail, Context};
use arcana::engine::{Engine, EngineOptions};
use arcana::prompt::conversation::model_name_from_path;
use arcana::serve::controller::{self, Controller, DispatchMethod};
use arcana::serve::http::{self, Access, ServeLimits, ServeOptions};
use arcana::serve::image_fetch::{AddressBlock, ImageFetchPolicy};
use arcana::serve::limits::{self, RequestLimits};
use arcana::serve::protocol::{HEART_BEAT_EXPIRATION, WORKER_HEART_BEAT_INTERVAL};
use arcana::serve::web::{self, ModelListMode, WebConfig, WebServer};
use arcana::serve::worker::{Worker, WorkerConfig};
use clap::{Parser, Subcommand};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

#[path = "shared/mod.rs"]
mod shared;

#[derive(Parser)]
#[command(version, about = "Arcana's controller, model workers and web UI (the release's serving protocol)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Routes requests to registered model workers (arcana.serve.controller).
    Controller(ControllerArgs),
    /// Serves one model and registers with a controller (arcana.serve.model_worker).
    Worker(WorkerArgs),
    /// The chat page (arcana.serve.gradio_web_server), talking to a controller.
    Web(WebArgs),
    /// Controller, one worker and the chat page in one process, all on 127.0.0.1.
    All(AllArgs),
}

/// What every server holds its clients to, and who may call it: the same flags on each subcommand.
#[derive(clap::Args, Clone)]
struct ServerFlags {
    /// Largest request body in bytes (images travel base64-encoded inside it); larger gets 413.
    #[arg(long, default_value_t = http::MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Open connections at once; one past it is closed when accepted.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers (an idle keep-alive connection too).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds from a request's headers to the start of its reply (a reply that is not streamed: the
    /// whole answer); past it the client gets 408.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Seconds a reply may wait for a client that has stopped reading it; then the connection is closed
    /// and its answer cancelled.
    #[arg(long, default_value_t = 60.0)]
    idle_timeout: f64,
    /// Bytes of a reply the kernel may queue for a client beyond what it has taken; past it writes wait,
    /// so a client that stops reading meets --idle-timeout after about this much plus its receive window.
    #[arg(long, default_value_t = http::MAX_UNSENT_BYTES)]
    max_unsent_bytes: usize,
    /// Every API call must carry `Authorization: Bearer KEY`; also sent to the other servers (use the
    /// same key for the controller, its workers and the page). The page asks for it once.
    #[arg(long, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// As --api-key, the key read from this file (first line), so it does not show in process lists.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// A host name clients may use in the Host header besides loopback names (repeat for more), e.g. the
    /// name a reverse proxy sends. A server on a loopback address answers only loopback names otherwise.
    #[arg(long = "allowed-host")]
    allowed_hosts: Vec<String>,
}

impl ServerFlags {
    fn options(&self, public_path: fn(&str) -> bool) -> anyhow::Result<ServeOptions> {
        let seconds = |name: &str, value: f64| -> anyhow::Result<Duration> {
            if !(value > 0.0 && value.is_finite()) {
                bail!("--{name} must be a positive number of seconds, got {value}");
            }
            Ok(Duration::from_secs_f64(value))
        };
        if self.max_connections == 0 || self.max_body_bytes == 0 || self.max_unsent_bytes == 0 {
            bail!("--max-connections, --max-body-bytes and --max-unsent-bytes must be at least 1");
        }
        let limits = ServeLimits {
            max_body_bytes: self.max_body_bytes,
            max_connections: self.max_connections,
            header_timeout: seconds("header-timeout", self.header_timeout)?,
            request_timeout: seconds("request-timeout", self.request_timeout)?,
            idle_timeout: seconds("idle-timeout", self.idle_timeout)?,
            max_unsent_bytes: self.max_unsent_bytes,
        };
        Ok(ServeOptions { limits, access: self.access()?, public_path })
    }

    fn access(&self) -> anyhow::Result<Access> {
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(key), _) => Some(key.trim().to_string()),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            (None, None) => None,
        };
        if api_key.as_deref() == Some("") {
            bail!("the API key is empty");
        }
        Ok(Access { api_key, allowed_hosts: self.allowed_hosts.clone() })
    }
}

#[derive(clap::Args)]
struct WebArgs {
    /// Address to listen on (the release's default is 0.0.0.0; 0.0.0.0 exposes it to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 7860)]
    port: u16,
    #[arg(long, default_value = "http://localhost:21001")]
    controller_url: String,
    #[command(flatten)]
    page: PageArgs,
    #[command(flatten)]
    server: ServerFlags,
}

/// The chat page's flags shared by `web` and `all`.
#[derive(clap::Args)]
struct PageArgs {
    /// Answers streaming at once; more wait their turn.
    #[arg(long, default_value_t = 16)]
    concurrency_count: usize,
    /// once: the model list is fetched at start-up (and again while empty); reload: on each page load.
    #[arg(long, default_value = "once", value_parser = ["once", "reload"])]
    model_list_mode: String,
    /// Refused: the release makes a public Gradio link through Gradio's servers.
    #[arg(long)]
    share: bool,
    /// Refused: the release's moderation calls a remote service.
    #[arg(long)]
    moderate: bool,
    /// Hide the title and the terms, for embedding the page.
    #[arg(long)]
    embed: bool,
    /// Folder for the conversation logs (YYYY-MM-DD-conv.json) and serve_images/.
    #[arg(long, default_value = ".")]
    log_dir: PathBuf,
    /// Longest wait, in seconds, for the worker's next chunk before the page is told it timed out.
    #[arg(long, default_value_t = 120)]
    stream_timeout: u64,
    #[command(flatten)]
    pixels: PixelLimitArg,
}

/// The pixel limit of an image, shared by the worker and the page.
#[derive(clap::Args, Clone, Copy)]
struct PixelLimitArg {
    /// Images with more pixels, or whose padded square has more (image_process_mode Pad on the page, models
    /// whose config says `image_aspect_ratio: pad`), are refused from their header before they are decoded.
    /// The default, 6000x6000, takes 24-megapixel photos and 12-megapixel ones padded; the model sees
    /// 336x336 whatever comes in.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_IMAGE_PIXELS)]
    max_image_pixels: u64,
}

/// What one request may carry, on the release's protocol and the OpenAI API.
#[derive(clap::Args)]
struct RequestLimitArgs {
    /// Images one request may carry (the release's model takes one per conversation turn, and its context
    /// holds three); more are refused before any is decoded.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_IMAGES_PER_REQUEST)]
    max_images_per_request: usize,
    /// Stop strings one request may carry (OpenAI allows 4).
    #[arg(long, default_value_t = limits::DEFAULT_MAX_STOP_STRINGS)]
    max_stop_strings: usize,
    /// Longest stop string in bytes: each new token is checked against every stop string.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_STOP_BYTES)]
    max_stop_length: usize,
    /// Longest JSON schema (as sent), regex or grammar in bytes, for constrained answers.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_CONSTRAINT_BYTES)]
    max_constraint_bytes: usize,
    /// Deepest nesting of objects and arrays in a JSON schema.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_SCHEMA_DEPTH)]
    max_schema_depth: usize,
    /// Most alternatives reported with each token's log-probability (OpenAI allows 20).
    #[arg(long, default_value_t = limits::DEFAULT_MAX_TOP_LOGPROBS)]
    max_top_logprobs: usize,
}

impl RequestLimitArgs {
    fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_images_per_request: self.max_images_per_request,
            max_stop_strings: self.max_stop_strings,
            max_stop_bytes: self.max_stop_length,
            max_constraint_bytes: self.max_constraint_bytes,
            max_schema_depth: self.max_schema_depth,
            max_top_logprobs: self.max_top_logprobs,
        }
    }
}

#[derive(clap::Args)]
struct AllArgs {
    /// The chat page's port.
    #[arg(long, default_value_t = 7860)]
    port: u16,
    #[arg(long, default_value_t = 21001)]
    controller_port: u16,
    #[arg(long, default_value_t = 21002)]
    worker_port: u16,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    page: PageArgs,
    /// Applied to the controller, the worker and the page alike.
    #[command(flatten)]
    server: ServerFlags,
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// Address to listen on (the release's default is localhost; 0.0.0.0 exposes it to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 21002)]
    port: u16,
    /// The URL the controller calls this worker at; default http://HOST:PORT as bound.
    #[arg(long)]
    worker_address: Option<String>,
    #[arg(long, default_value = "http://localhost:21001")]
    controller_address: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Seconds between heart beats to the controller (the release's 15; shorter for tests).
    #[arg(long, default_value_t = 15.0, hide = true)]
    heart_beat_interval: f64,
    /// Do not register with a controller (serve directly, e.g. behind a load balancer).
    #[arg(long)]
    no_register: bool,
    #[command(flatten)]
    server: ServerFlags,
    #[command(flatten)]
    pixels: PixelLimitArg,
}

/// The model a worker serves, shared by `worker` and `all`.
#[derive(clap::Args)]
struct ModelArgs {
    /// Model folder in the release's layout.
    #[arg(long)]
    model_path: PathBuf,
    /// Base model for a checkpoint holding only a projector or LoRA weights.
    #[arg(long)]
    model_base: Option<PathBuf>,
    /// The name clients ask for; default the model folder's name (`checkpoint-N` as parent_checkpoint-N).
    #[arg(long)]
    model_name: Option<String>,
    #[command(flatten)]
    placement: shared::DeviceFlags,
    /// Requests generating at once; more wait in a queue.
    #[arg(long, default_value_t = 5)]
    limit_model_concurrency: usize,
    /// Answers decoded together, one forward per token for all of them (continuous batching); default
    /// the concurrency limit. 1 answers one request at a time, each exactly as the CLI would.
    #[arg(long)]
    max_batch: Option<usize>,
    #[command(flatten)]
    reuse: shared::ReuseFlags,
    #[command(flatten)]
    weights: shared::WeightFlags,
    /// Let the OpenAI API fetch http(s) image URLs (off: only data: URLs are accepted).
    #[arg(long)]
    allow_image_urls: bool,
    #[command(flatten)]
    limits: RequestLimitArgs,
    /// Largest image fetched from a URL, in bytes; the download stops as soon as it is exceeded.
    #[arg(long, default_value_t = ImageFetchPolicy::DEFAULT_MAX_BYTES, requires = "allow_image_urls")]
    image_url_max_bytes: usize,
    /// Seconds one image URL may take, redirects included.
    #[arg(long, default_value_t = ImageFetchPolicy::DEFAULT_TIMEOUT_SECONDS, requires = "allow_image_urls")]
    image_url_timeout: u64,
    /// Redirects followed for one image URL (each target is checked as the URL itself).
    #[arg(long, default_value_t = ImageFetchPolicy::DEFAULT_MAX_REDIRECTS, requires = "allow_image_urls")]
    image_url_max_redirects: usize,
    /// Image URLs in one request; a request with more is refused before anything is fetched.
    #[arg(long, default_value_t = ImageFetchPolicy::DEFAULT_MAX_URLS_PER_REQUEST, requires = "allow_image_urls")]
    max_image_urls_per_request: usize,
    /// Fetch from these non-public addresses all the same (CIDR, e.g. 10.1.0.0/16 for an intranet image
    /// store; repeatable). Loopback, private, link-local and other non-public addresses are refused otherwise.
    #[arg(long = "image-url-allow", value_name = "CIDR", requires = "allow_image_urls")]
    image_url_allow: Vec<AddressBlock>,
}

impl ModelArgs {
    fn image_fetch_policy(&self) -> anyhow::Result<ImageFetchPolicy> {
        if self.image_url_max_bytes == 0 {
            bail!("--image-url-max-bytes must be at least 1");
        }
        if self.image_url_timeout == 0 {
            bail!("--image-url-timeout must be at least 1 (seconds)");
        }
        if self.max_image_urls_per_request == 0 {
            bail!("--max-image-urls-per-request must be at least 1 (without --allow-image-urls no URL is fetched)");
        }
        Ok(ImageFetchPolicy {
            max_bytes: self.image_url_max_bytes,
            total_timeout: Duration::from_secs(self.image_url_timeout),
            max_redirects: self.image_url_max_redirects,
            max_urls_per_request: self.max_image_urls_per_request,
            allowed_addresses: self.image_url_allow.clone(),
        })
    }
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Address to listen on (the release's default is localhost; 0.0.0.0 exposes it to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 21001)]
    port: u16,
    #[arg(long, default_value = "shortest_queue", value_parser = ["lottery", "shortest_queue"])]
    dispatch_method: String,
    /// Longest wait, in seconds, for a worker's reply or its next stream chunk before the client gets an
    /// error-3 chunk naming the worker.
    #[arg(long, default_value_t = 300)]
    stream_timeout: u64,
    /// Seconds without a heart beat after which a worker is dropped (the release's 30; shorter for tests).
    #[arg(long, default_value_t = 30.0, hide = true)]
    heart_beat_expiration: f64,
    /// Accept worker registrations, heart beats and removals from other machines without an API key
    /// (by default only loopback clients may change the worker list unless --api-key is set).
    #[arg(long)]
    allow_remote_workers: bool,
    #[command(flatten)]
    server: ServerFlags,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// A bound server that serves until Ctrl-C or SIGTERM.
type Serving = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Controller(args) => start_controller(&args).await?.1.await,
            Command::Worker(args) => start_worker(args).await?.await,
            Command::Web(args) => {
                start_web(&args.host, args.port, &args.controller_url, &args.page, &args.server).await?.await
            }
            Command::All(args) => run_all(args).await,
        }
    })
}

/// Binds the controller; returns its URL and the serving future. The first stdout line says where to
/// reach it (port 0 picks a free port).
async fn start_controller(args: &ControllerArgs) -> anyhow::Result<(String, Serving)> {
    let dispatch: DispatchMethod = args.dispatch_method.parse().map_err(anyhow::Error::msg)?;
    let options = args.server.options(|path| path == "/health")?;
    let controller = Controller::new(dispatch, Duration::from_secs(args.stream_timeout))
        .with_expiration(Duration::from_secs_f64(args.heart_beat_expiration))
        .with_access(options.access.clone())
        .allowing_remote_workers(args.allow_remote_workers);
    let (listener, addr) =
        http::bind(&args.host, args.port).await.with_context(|| format!("binding {}:{}", args.host, args.port))?;
    controller::spawn_expiry(controller.clone());
    println!("controller listening on http://{addr}");
    tracing::info!(%addr, ?dispatch, "controller started");
    let serving = async move {
        http::serve_with(listener, arcana::serve::controller_app(controller), options)
            .await
            .context("serving the controller")
    };
    Ok((format!("http://{addr}"), Box::pin(serving)))
}

/// Binds the worker and starts loading its model on the engine's own thread; returns the serving future.
async fn start_worker(args: WorkerArgs) -> anyhow::Result<Serving> {
    let model = &args.model;
    if model.limit_model_concurrency == 0 {
        bail!("--limit-model-concurrency must be at least 1");
    }
    let max_batch = model.max_batch.unwrap_or(model.limit_model_concurrency);
    if max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    let serve_options = args.server.options(|path| path == "/health")?;
    let image_fetch_policy = model.image_fetch_policy()?;
    let (device, placement) = model.placement.resolve()?;
    let choice = model.weights.resolve(device, &placement)?;
    let threads = model.weights.threads()?;
    let kind = choice.kind;
    let weights = shared::weights_folder(&model.model_path, model.model_base.as_deref(), kind)?;
    let model_path = model.model_path.to_string_lossy().into_owned();
    let model_name = match &model.model_name {
        Some(name) => name.clone(),
        None => model_name_from_path(&model_path)?,
    };
    let (listener, addr) =
        http::bind(&args.host, args.port).await.with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let worker_address = args.worker_address.clone().unwrap_or_else(|| format!("http://{addr}"));
    let worker = Worker::new(WorkerConfig {
        model_name: model_name.clone(),
        worker_address,
        controller_address: (!args.no_register).then(|| args.controller_address.trim_end_matches('/').to_string()),
        limit_model_concurrency: model.limit_model_concurrency,
        allow_image_urls: model.allow_image_urls,
        image_fetch_policy,
        heart_beat_interval: Duration::from_secs_f64(args.heart_beat_interval),
        access: serve_options.access.clone(),
        limits: model.limits.limits(),
    });
    // The model loads on the engine's own thread while the server already answers /health.
    let options = EngineOptions {
        kind,
        device,
        quantization: choice.quantization,
        merge_lora: choice.merge_lora,
        vision_linears: choice.vision_linears,
        threads,
        model_name_path: Some(model_path),
        with_model_base: model.model_base.is_some(),
        placement,
        max_image_pixels: args.pixels.max_image_pixels,
        reuse_budget_bytes: model.reuse.reuse_cache_bytes,
        prefill_chunk: model.reuse.prefill_chunk,
        ..EngineOptions::default()
    };
    let loading = worker.clone();
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        tracing::info!(model = %weights.display(), ?kind, ?device, ?threads, "loading");
        let loaded = Engine::load(&weights, options).and_then(|engine| {
            let (placed, warnings) = shared::describe_plan(engine.plan());
            placed.into_iter().for_each(|line| tracing::info!("{line}"));
            warnings.iter().for_each(|w| tracing::warn!("{w}"));
            engine.spawn_batched(max_batch)
        });
        match loaded {
            Ok((handle, _thread)) => {
                loading.set_engine(handle);
                tracing::info!("model loaded");
                runtime.spawn(async move {
                    if let Err(e) = loading.register().await {
                        tracing::warn!("registering failed: {e} (the next heart beat retries)");
                    }
                    loading.spawn_heart_beats();
                });
            }
            Err(e) => {
                tracing::error!("loading failed: {e}");
                loading.set_load_error(e.to_string());
            }
        }
    });
    println!("worker listening on http://{addr}");
    tracing::info!(%addr, model_name, "worker started");
    Ok(Box::pin(async move {
        let served = http::serve_with(listener, arcana::serve::worker_app(worker.clone()), serve_options)
            .await
            .context("serving the worker");
        // Shutting down: leave the controller's list now rather than after the heart-beat expiry.
        worker.unregister().await;
        served
    }))
}

/// Binds the chat page; refuses the release's flags that need remote services.
async fn start_web(
    host: &str,
    port: u16,
    controller_url: &str,
    page: &PageArgs,
    server_flags: &ServerFlags,
) -> anyhow::Result<Serving> {
    if page.share {
        bail!(
            "--share is not supported: the release makes a public link through Gradio's servers; \
               serve on --host 0.0.0.0 behind your own proxy instead"
        );
    }
    if page.moderate {
        bail!(
            "--moderate is not supported: the release's moderation needs a remote service (OpenAI's \
               moderation API), which this server does not call"
        );
    }
    if page.concurrency_count == 0 {
        bail!("--concurrency-count must be at least 1");
    }
    let options = server_flags.options(web::is_public_path)?;
    let server = WebServer::new(WebConfig {
        controller_url: controller_url.to_string(),
        concurrency_count: page.concurrency_count,
        model_list_mode: page.model_list_mode.parse::<ModelListMode>().map_err(anyhow::Error::msg)?,
        embed: page.embed,
        log_dir: page.log_dir.clone(),
        stream_timeout: Duration::from_secs(page.stream_timeout.max(1)),
        access: options.access.clone(),
        max_image_pixels: page.pixels.max_image_pixels,
    });
    // As the release, the list is fetched at start-up; an unreachable controller is reported, not fatal.
    match server.fetch_models().await {
        Ok(models) => tracing::info!(?models, "models"),
        Err(e) => tracing::warn!("{e}"),
    }
    let (listener, addr) = http::bind(host, port).await.with_context(|| format!("binding {host}:{port}"))?;
    println!("web listening on http://{addr}");
    tracing::info!(%addr, controller_url, log_dir = %page.log_dir.display(), "web server started");
    Ok(Box::pin(async move {
        http::serve_with(listener, web::router(server), options).await.context("serving the web page")
    }))
}

/// Controller, one worker and the chat page in one process, all on 127.0.0.1.
async fn run_all(args: AllArgs) -> anyhow::Result<()> {
    let host = "127.0.0.1".to_string();
    let (controller_url, controller) = start_controller(&ControllerArgs {
        host: host.clone(),
        port: args.controller_port,
        dispatch_method: "shortest_queue".into(),
        stream_timeout: 300,
        heart_beat_expiration: HEART_BEAT_EXPIRATION.as_secs_f64(),
        allow_remote_workers: false,
        server: args.server.clone(),
    })
    .await?;
    let worker = start_worker(WorkerArgs {
        host: host.clone(),
        port: args.worker_port,
        worker_address: None,
        controller_address: controller_url.clone(),
        model: args.model,
        heart_beat_interval: WORKER_HEART_BEAT_INTERVAL.as_secs_f64(),
        no_register: false,
        server: args.server.clone(),
        pixels: args.page.pixels,
    })
    .await?;
    // Controller and worker serve before the page starts: it asks the controller for models at start-up.
    let controller = tokio::spawn(controller);
    let worker = tokio::spawn(worker);
    let web = start_web(&host, args.port, &controller_url, &args.page, &args.server).await?;
    let (controller, worker, web) = tokio::join!(controller, worker, web);
    controller.context("the controller task")??;
    worker.context("the worker task")??;
    web
}
