//! The release's serving stack over HTTP: the controller that routes requests to model workers
//! (`arcana-serve controller`), the model worker (`arcana-serve worker`) and the chat page
//! (`arcana-serve web`), with the release's endpoints, bodies, stream format and timings, plus an
//! OpenAI-compatible API on the worker and the controller.
//! HTTP runs on tokio; model work never runs on the async runtime.
pub mod controller;
pub mod http;
pub mod openai;
pub mod protocol;
pub mod web;
pub mod worker;
