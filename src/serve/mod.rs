//! The release's serving stack over HTTP: the controller that routes requests to model workers
//! (`arcana-serve controller`), the model worker (`arcana-serve worker`) and the chat page
//! (`arcana-serve web`), with the release's endpoints, bodies, stream format and timings, plus an
//! OpenAI-compatible API on the worker and the controller.
//! HTTP runs on tokio; model work never runs on the async runtime.
pub mod controller;
pub mod http;
pub mod image_fetch;
pub mod limits;
pub mod openai;
pub mod protocol;
pub mod web;
pub mod worker;

use axum::http::StatusCode;
use axum::Router;

/// The worker's HTTP server: the release's routes and the OpenAI-compatible API.
pub fn worker_app(worker: worker::Worker) -> Router {
    worker::routes(worker.clone()).merge(openai::worker_routes(worker)).fallback(not_found)
}

/// The controller's HTTP server: the release's routes and the OpenAI-compatible API routed by `model`.
pub fn controller_app(controller: controller::Controller) -> Router {
    controller::routes(controller.clone()).merge(openai::controller_routes(controller)).fallback(not_found)
}

async fn not_found() -> axum::response::Response {
    http::json_error(StatusCode::NOT_FOUND, "no such endpoint")
}
