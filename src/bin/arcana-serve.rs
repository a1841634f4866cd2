//! `arcana-serve`: the release's serving stack (arcana/serve/*.py) in one binary.
//!
//!     arcana-serve controller [--host 127.0.0.1] [--port 21001] [--dispatch-method shortest_queue|lottery]
//!     arcana-serve worker --model-path DIR [--port 21002] [--controller-address http://localhost:21001]
use anyhow::{bail, Context};
use arcana::engine::{Engine, EngineOptions};
use arcana::llm::quant::Quantization;
use arcana::mm::conversation::model_name_from_path;
use arcana::serve::controller::{self, Controller, DispatchMethod};
use arcana::serve::http;
use arcana::serve::worker::{self, Worker, WorkerConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
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
    /// Model folder in the release's layout.
    #[arg(long)]
    model_path: PathBuf,
    /// Base model for a checkpoint holding only a projector or LoRA weights.
    #[arg(long)]
    model_base: Option<PathBuf>,
    /// The name clients ask for; default the model folder's name (`checkpoint-N` as parent_checkpoint-N).
    #[arg(long)]
    model_name: Option<String>,
    /// cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Requests generating at once; more wait in a queue.
    #[arg(long, default_value_t = 5)]
    limit_model_concurrency: usize,
    /// Weight-only int8 decoder projections.
    #[arg(long)]
    load_8bit: bool,
    /// Weight-only int4 decoder projections.
    #[arg(long, conflicts_with = "load_8bit")]
    load_4bit: bool,
    /// Do not register with a controller (serve directly, e.g. behind a load balancer).
    #[arg(long)]
    no_register: bool,
    /// Let the OpenAI API fetch http(s) image URLs (off: only data: URLs are accepted).
    #[arg(long)]
    allow_image_urls: bool,
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
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Controller(args) => run_controller(args).await,
            Command::Worker(args) => run_worker(args).await,
        }
    })
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let dispatch: DispatchMethod = args.dispatch_method.parse().map_err(anyhow::Error::msg)?;
    let controller = Controller::new(dispatch, Duration::from_secs(args.stream_timeout));
    let (listener, addr) =
        http::bind(&args.host, args.port).await.with_context(|| format!("binding {}:{}", args.host, args.port))?;
    controller::spawn_expiry(controller.clone());
    // The first stdout line says where to reach the controller (port 0 picks a free port).
    println!("controller listening on http://{addr}");
    tracing::info!(%addr, ?dispatch, "controller started");
    http::serve(listener, controller::router(controller)).await.context("serving")?;
    Ok(())
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    if args.limit_model_concurrency == 0 {
        bail!("--limit-model-concurrency must be at least 1");
    }
    let device = shared::parse_device(&args.device)?;
    let kind = shared::default_kind(device);
    let weights = shared::weights_folder(&args.model_path, args.model_base.as_deref(), kind)?;
    let model_path = args.model_path.to_string_lossy().into_owned();
    let model_name = match &args.model_name {
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
        limit_model_concurrency: args.limit_model_concurrency,
        allow_image_urls: args.allow_image_urls,
    });
    // The model loads on the engine's own thread while the server already answers /health.
    let options = EngineOptions {
        kind,
        device,
        quantization: match (args.load_8bit, args.load_4bit) {
            (true, _) => Some(Quantization::Int8),
            (_, true) => Some(Quantization::Int4),
            _ => None,
        },
        model_name_path: Some(model_path),
        with_model_base: args.model_base.is_some(),
        ..EngineOptions::default()
    };
    let loading = worker.clone();
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        tracing::info!(model = %weights.display(), ?kind, ?device, "loading");
        match Engine::load(&weights, options).and_then(Engine::spawn) {
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
    http::serve(listener, worker::router(worker)).await.context("serving")?;
    Ok(())
}
