//! `arcana-serve`: the release's serving stack (arcana/serve/*.py) in one binary.
//!
//!     arcana-serve controller [--host 127.0.0.1] [--port 21001] [--dispatch-method shortest_queue|lottery]
use anyhow::Context;
use arcana::serve::controller::{self, Controller, DispatchMethod};
use arcana::serve::http;
use clap::{Parser, Subcommand};
use std::time::Duration;

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
