//! HTTP plumbing shared by the servers: JSON bodies whose errors are JSON too, the body-size limit,
//! and binding a listener that reports its real address (port 0 picks a free one).
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

/// Largest request body accepted (images travel as base64 inside JSON); larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// `{"error": message}` with `status`.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message, "status": status.as_u16() }))).into_response()
}

/// A JSON body; a malformed or mistyped one is refused with a JSON error naming the problem.
pub struct JsonBody<T>(pub T);

#[axum::async_trait]
impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_error(rejection_status(&rejection), &rejection.body_text())),
        }
    }
}

/// The status for a refused JSON body: 413 when it could not be read whole (over the body limit).
pub fn rejection_status(rejection: &JsonRejection) -> StatusCode {
    match rejection {
        JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
        other => other.status(),
    }
}

/// Binds `host:port` and returns the listener with the address it got.
pub async fn bind(host: &str, port: u16) -> std::io::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind((host, port)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// How long in-flight requests may run on after Ctrl-C or SIGTERM before the server stops anyway.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app` on `listener` with the body limit applied. On Ctrl-C or SIGTERM it stops accepting
/// connections, lets in-flight requests (streams included) finish for up to `SHUTDOWN_GRACE`, then
/// returns.
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
    let app = app.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES));
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing in-flight requests");
            stopping.notify_one();
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    tokio::select! {
        result = server => result,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("requests still open {SHUTDOWN_GRACE:?} after the shutdown signal; stopping");
            Ok(())
        }
    }
}

/// As [`serve`], with each request's client address available (`ConnectInfo`), for logs that record it.
pub async fn serve_with_client_addresses(listener: tokio::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
    let app = app.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES));
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
}
