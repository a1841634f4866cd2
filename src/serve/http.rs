//! HTTP plumbing shared by the servers: JSON bodies whose errors are JSON too, binding a listener that
//! reports its real address (port 0 picks a free one), and the serving loop that holds every client to
//! the limits in [`ServeLimits`] and the access rules in [`Access`].
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Default largest request body (images travel as base64 inside JSON); larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Default cap on the reply bytes the kernel queues unsent for one client (`--max-unsent-bytes`).
pub const MAX_UNSENT_BYTES: usize = 16 * 1024;

/// How much of a peer server's JSON reply (a status, a model list, an error) is read at most.
pub const MAX_PEER_REPLY_BYTES: usize = 1024 * 1024;

/// The limits a server holds every client to; each is a flag of `arcana-serve` with these defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeLimits {
    /// Largest request body; larger ones get 413 before the handler runs.
    pub max_body_bytes: usize,
    /// Open connections at once; a connection past it is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Longest time a client may take to send a request's headers (also an idle keep-alive connection).
    pub header_timeout: Duration,
    /// Longest time from a request's headers to its reply's start: reading the body, checking it, and
    /// for a reply that is not streamed, the whole answer.
    pub request_timeout: Duration,
    /// Longest time a reply may wait for the client to take more of it; a client that stops reading
    /// is disconnected, which cancels its answer and frees its slot.
    pub idle_timeout: Duration,
    /// Reply bytes the kernel may queue for a client beyond what its receive window has taken; past
    /// it writes wait, so a client that stops reading stalls them (and meets `idle_timeout`) early.
    pub max_unsent_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: MAX_BODY_BYTES,
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            max_unsent_bytes: MAX_UNSENT_BYTES,
        }
    }
}

/// Who may call a server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Access {
    /// When set, every route except the public ones needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Host names accepted in the `Host` header besides loopback ones. A server bound to a loopback
    /// address with no names here accepts loopback names only (a DNS-rebinding page cannot reach it);
    /// a server bound elsewhere with no names here accepts any.
    pub allowed_hosts: Vec<String>,
}

impl Access {
    /// `Authorization: Bearer KEY` for calls to a peer server of the same deployment.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

/// What a server serves and how: its routes, limits and access rules, and which paths need no key.
pub struct ServeOptions {
    pub limits: ServeLimits,
    pub access: Access,
    /// Paths answered without the API key (health checks, the page's static files).
    pub public_path: fn(&str) -> bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { limits: ServeLimits::default(), access: Access::default(), public_path: only_health_is_public }
    }
}

fn only_health_is_public(path: &str) -> bool {
    path == "/health"
}

/// `{"error": message}` with `status`.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message, "status": status.as_u16() }))).into_response()
}

/// An error in the shape the path's clients read: OpenAI's under `/v1/`, ours elsewhere.
fn refusal(path: &str, status: StatusCode, message: &str) -> Response {
    if path.starts_with("/v1/") {
        let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
                                                 "param": null, "code": null}});
        (status, Json(body)).into_response()
    } else {
        json_error(status, message)
    }
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

/// Reads a peer's reply body up to `limit` bytes; a longer body is an error, not an allocation.
pub async fn read_limited(mut reply: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if reply.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("reply larger than {limit} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = reply.chunk().await.map_err(|e| format!("reply broken: {e}"))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("reply larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A peer's JSON reply, read up to [`MAX_PEER_REPLY_BYTES`].
pub async fn read_json<T: DeserializeOwned>(reply: reqwest::Response) -> Result<T, String> {
    let body = read_limited(reply, MAX_PEER_REPLY_BYTES).await?;
    serde_json::from_slice(&body).map_err(|e| format!("reply does not parse: {e}"))
}

/// Binds `host:port` and returns the listener with the address it got.
pub async fn bind(host: &str, port: u16) -> std::io::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind((host, port)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// How long in-flight requests may run on after Ctrl-C or SIGTERM before the server stops anyway.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app` on `listener` with the default limits and no key.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    serve_with(listener, app, ServeOptions::default()).await
}

/// Serves `app` on `listener` under `options`; each request carries its client's address
/// (`ConnectInfo<SocketAddr>`). On Ctrl-C or SIGTERM it stops accepting connections, lets in-flight
/// requests (streams included) finish for up to `SHUTDOWN_GRACE`, then returns.
pub async fn serve_with(listener: tokio::net::TcpListener, app: Router, options: ServeOptions) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let limits = options.limits.clone();
    let app = guarded(app, options, local);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stopping = shutdown_signal();
    tokio::pin!(stopping);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stopping => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(client = %remote, limit = limits.max_connections, "connection closed: --max-connections reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = cap_unsent_bytes(&stream, limits.max_unsent_bytes) {
            tracing::warn!(client = %remote, error = %e, "the unsent-bytes cap could not be set");
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone().layer(Extension(ConnectInfo(remote))));
        let io = hyper_util::rt::TokioIo::new(StalledWriteLimit::new(stream, limits.idle_timeout));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(io, service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(client = %remote, error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("requests still open {SHUTDOWN_GRACE:?} after the shutdown signal; stopping");
        }
    }
    Ok(())
}

/// `app` behind the body limit, the request timeout and the access rules.
fn guarded(app: Router, options: ServeOptions, local: SocketAddr) -> Router {
    let ServeOptions { limits, access, public_path } = options;
    let host_check = HostCheck::new(&access.allowed_hosts, local.ip());
    let gate =
        Arc::new(Gate { api_key: access.api_key, host_check, public_path, max_body_bytes: limits.max_body_bytes });
    let timeout = limits.request_timeout;
    app.layer(axum::middleware::from_fn(move |request: Request, next: Next| {
        let gate = gate.clone();
        async move {
            let path = request.uri().path().to_string();
            if let Err((status, message)) = gate.admit(request.headers(), &path) {
                return refusal(&path, status, &message);
            }
            match tokio::time::timeout(timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => refusal(
                    &path,
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "the request took longer than the server's limit of {} s (--request-timeout)",
                        timeout.as_secs()
                    ),
                ),
            }
        }
    }))
    .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
}

/// The checks made on every request before its handler runs.
struct Gate {
    api_key: Option<String>,
    host_check: HostCheck,
    public_path: fn(&str) -> bool,
    max_body_bytes: usize,
}

impl Gate {
    fn admit(&self, headers: &HeaderMap, path: &str) -> Result<(), (StatusCode, String)> {
        if let Some(host) = headers.get(header::HOST) {
            let host = host.to_str().unwrap_or("");
            if !self.host_check.accepts(host) {
                return Err((
                    StatusCode::MISDIRECTED_REQUEST,
                    format!("host `{}` is not served here (add it with --allowed-host)", host.escape_debug()),
                ));
            }
        }
        // A body announced over the limit is refused before any of it is read (the body limit alone
        // would wait for the bytes to arrive).
        let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than the server's limit of {} bytes (--max-body-bytes)",
                    self.max_body_bytes
                ),
            ));
        }
        let Some(key) = &self.api_key else { return Ok(()) };
        if (self.public_path)(path) {
            return Ok(());
        }
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(given) if same_secret(given.trim().as_bytes(), key.as_bytes()) => Ok(()),
            Some(_) => Err((StatusCode::UNAUTHORIZED, "the API key is not valid".into())),
            None => {
                Err((StatusCode::UNAUTHORIZED, "this server needs an API key: send `Authorization: Bearer KEY`".into()))
            }
        }
    }
}

/// Compares without stopping at the first difference, so the time taken does not reveal the key.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let mut difference = given.len() ^ key.len();
    for (i, k) in key.iter().enumerate() {
        difference |= usize::from(given.get(i).copied().unwrap_or(0) ^ k);
    }
    difference == 0
}

/// Which `Host` headers a server answers (against DNS rebinding: a page on another site whose name
/// resolves to 127.0.0.1 sends its own name).
#[derive(Debug)]
struct HostCheck {
    allowed: Vec<String>,
    /// Without allowed names: only loopback names (a server bound to loopback) or any (bound elsewhere).
    loopback_only: bool,
}

impl HostCheck {
    fn new(allowed: &[String], bound: IpAddr) -> Self {
        Self { allowed: allowed.iter().map(|h| h.to_ascii_lowercase()).collect(), loopback_only: bound.is_loopback() }
    }

    fn accepts(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        if is_loopback_name(&name) || self.allowed.contains(&name) {
            return true;
        }
        self.allowed.is_empty() && !self.loopback_only
    }
}

/// The name part of a `Host` header: without the port, IPv6 brackets kept off.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.rsplit_once(':')
        .map_or(host, |(name, port)| if port.chars().all(|c| c.is_ascii_digit()) { name } else { host })
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Caps the reply bytes queued unsent on `stream`. Left alone, the kernel grows a connection's send
/// buffer to megabytes (tcp_wmem): a client that stops reading would take a whole long answer (the
/// release's cumulative chunks make 1000 tokens about 2.5 MB) without a write ever waiting, so
/// [`StalledWriteLimit`] never saw it stall and the answer ran to its end, holding its slot.
/// `TCP_NOTSENT_LOWAT` bounds only what waits unsent, so a reading client's bytes in flight are not.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn cap_unsent_bytes(stream: &tokio::net::TcpStream, bytes: usize) -> std::io::Result<()> {
    // The option is a C int.
    socket2::SockRef::from(stream).set_tcp_notsent_lowat(bytes.min(i32::MAX as usize) as u32)
}

/// Without `TCP_NOTSENT_LOWAT` the send buffer itself is capped (which bounds the bytes in flight too).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn cap_unsent_bytes(stream: &tokio::net::TcpStream, bytes: usize) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_send_buffer_size(bytes)
}

/// A connection whose writes fail once the client has taken nothing for `limit`: a client that stops
/// reading cannot hold its connection (and through it an answer's slot) forever.
struct StalledWriteLimit<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StalledWriteLimit<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit, stalled: None }
    }

    /// Passes `poll`'s result on, and fails it once it has been pending for longer than the limit.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StalledWriteLimit<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StalledWriteLimit<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// Text from a client or a peer, made safe for one log line (newlines and other controls escaped).
pub fn loggable(text: &str) -> String {
    text.chars().take(200).flat_map(char::escape_debug).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_answer_loopback_names_only() {
        let check = HostCheck::new(&[], "127.0.0.1".parse().unwrap());
        for host in ["localhost", "localhost:21001", "127.0.0.1:80", "127.9.9.9", "[::1]:7860", "app.localhost"] {
            assert!(check.accepts(host), "{host}");
        }
        for host in ["evil.example", "evil.example:21001", "10.0.0.1", "localhost.evil.example"] {
            assert!(!check.accepts(host), "{host}");
        }
        let named = HostCheck::new(&["Workers".into()], "127.0.0.1".parse().unwrap());
        assert!(named.accepts("workers:8080") && !named.accepts("other"));
        let open = HostCheck::new(&[], "0.0.0.0".parse().unwrap());
        assert!(open.accepts("any.example"));
        let restricted = HostCheck::new(&["chat.example".into()], "0.0.0.0".parse().unwrap());
        assert!(restricted.accepts("chat.example") && !restricted.accepts("any.example"));
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same_secret(b"secret", b"secret"));
        assert!(!same_secret(b"secreT", b"secret"));
        assert!(!same_secret(b"secret-longer", b"secret"));
        assert!(!same_secret(b"", b"secret"));
    }

    #[test]
    fn log_text_stays_on_one_line() {
        assert_eq!(loggable("a\nINFO forged"), "a\\nINFO forged");
        assert_eq!(loggable(&"x".repeat(500)).len(), 200);
    }
}
