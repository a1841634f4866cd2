//! Image URL fetching (`--allow-image-urls`) against a small HTTP server on 127.0.0.2, with a policy that
//! allows only 127.0.0.2/32: images and redirect chains within the limit are fetched; redirects to
//! 127.0.0.1, a fourth redirect, bodies past the size limit and slow bodies are refused, reading no
//! further than the limits; URLs to refused addresses never connect; a closed and a silent port read the
//! same. Then through a real worker: a request with more image URLs than allowed gets a 400 without a
//! fetch, and an image fetched by URL gives the same answer as the same image sent as a data: URL.
mod common;

use arcana::serve::image_fetch::{fetch_image, FetchRefusal, ImageFetchPolicy, NonPublic};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;

const IMAGE: &[u8] = b"\x89PNG\r\n\x1a\n not really a PNG, but the fetch does not decode";
/// Payload per chunk of the endless body, and the server's socket send buffer.
const CHUNK: usize = 64 * 1024;

/// What the test server has seen and done.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Body bytes the endless answer wrote before its client went away.
    endless_sent: Mutex<Option<usize>>,
    endless_done: Notify,
}

/// A raw HTTP/1.1 server: `/image`, `/hops/N` (N >= 1 redirects, then the image), `/to/HOST:PORT` (a redirect
/// to that server's image), `/endless` (a chunked body without end), `/declared-huge` (a Content-Length of
/// 10 GB), `/slow` (one byte per 100 ms).
struct TestServer {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

impl TestServer {
    async fn start(ip: &str, image: Vec<u8>) -> TestServer {
        let socket = TcpSocket::new_v4().unwrap();
        // A small send buffer keeps what the kernel holds for a reader that has stopped small.
        socket.set_send_buffer_size(CHUNK as u32).unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let image = Arc::new(image);
        tokio::spawn(accept_loop(listener, seen.clone(), image));
        TestServer { addr, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connections accepted before now: a probe request is answered only after every earlier connection
    /// was accepted (the accept queue is first come, first served), and is not counted.
    async fn connections_so_far(&self) -> usize {
        let probe = fetch_image(&self.url("/image"), &policy_allowing(&["127.0.0.0/8"])).await;
        assert!(probe.is_ok(), "probe: {probe:?}");
        self.seen.connections.load(Ordering::SeqCst) - 1
    }

    async fn endless_bytes_sent(&self) -> usize {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = self.seen.endless_done.notified();
                if let Some(sent) = *self.seen.endless_sent.lock().unwrap() {
                    return sent;
                }
                notified.await;
            }
        })
        .await
        .expect("the endless body was never cut off by its client")
    }
}

async fn accept_loop(listener: TcpListener, seen: Arc<Seen>, image: Arc<Vec<u8>>) {
    while let Ok((stream, _)) = listener.accept().await {
        seen.connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(answer(stream, seen.clone(), image.clone()));
    }
}

async fn answer(mut stream: TcpStream, seen: Arc<Seen>, image: Arc<Vec<u8>>) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
    let redirect =
        |location: String| format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n");
    let reply = if path == "/image" {
        let mut reply =
            format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", image.len())
                .into_bytes();
        reply.extend_from_slice(&image);
        reply
    } else if let Some(n) = path.strip_prefix("/hops/").and_then(|n| n.parse::<usize>().ok()) {
        // Relative and absolute Locations in turn.
        match n {
            1 => redirect("/image".into()),
            n if n % 2 == 0 => redirect(format!("/hops/{}", n - 1)),
            n => redirect(format!("http://{}/hops/{}", stream.local_addr().unwrap(), n - 1)),
        }
        .into_bytes()
    } else if let Some(target) = path.strip_prefix("/to/") {
        redirect(format!("http://{target}/image")).into_bytes()
    } else if path == "/endless" {
        let sent = endless_body(&mut stream).await;
        *seen.endless_sent.lock().unwrap() = Some(sent);
        seen.endless_done.notify_waiters();
        return;
    } else if path == "/declared-huge" {
        // Headers only: a client that waits for the body waits for the time limit.
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n").await;
        let _ = stream.read(&mut buffer).await;
        return;
    } else if path == "/slow" {
        if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n").await.is_err() {
            return;
        }
        for _ in 0..1000 {
            if stream.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        return;
    } else {
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}

/// Writes chunks until the client goes away; returns the body bytes written.
async fn endless_body(stream: &mut TcpStream) -> usize {
    if stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .is_err()
    {
        return 0;
    }
    let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', CHUNK));
    chunk.extend_from_slice(b"\r\n");
    let mut sent = 0;
    while stream.write_all(&chunk).await.is_ok() {
        sent += CHUNK;
    }
    sent
}

fn policy_allowing(blocks: &[&str]) -> ImageFetchPolicy {
    ImageFetchPolicy {
        max_bytes: 1024 * 1024,
        total_timeout: Duration::from_secs(10),
        allowed_addresses: blocks.iter().map(|b| b.parse().unwrap()).collect(),
        ..ImageFetchPolicy::default()
    }
}

/// The policy of these tests: of the non-public addresses, only 127.0.0.2.
fn policy() -> ImageFetchPolicy {
    policy_allowing(&["127.0.0.2/32"])
}

async fn refusal(url: &str, policy: &ImageFetchPolicy) -> (FetchRefusal, String) {
    let error = fetch_image(url, policy).await.expect_err(url);
    (error.refusal.clone(), error.to_string())
}

#[tokio::test]
async fn an_allowed_address_is_fetched_with_up_to_three_redirects_and_a_fourth_is_refused() {
    let server = TestServer::start("127.0.0.2", IMAGE.to_vec()).await;
    assert_eq!(fetch_image(&server.url("/image"), &policy()).await.unwrap(), IMAGE);
    assert_eq!(fetch_image(&server.url("/hops/3"), &policy()).await.unwrap(), IMAGE);
    let (why, text) = refusal(&server.url("/hops/4"), &policy()).await;
    assert_eq!(why, FetchRefusal::TooManyRedirects(3), "{text}");
    assert!(text.contains("more than 3 redirects") && text.contains("127.0.0.2"), "{text}");
    // One connection per answer: 1 for the image, 4 for 3 redirects and the image, 4 for the 4 redirects
    // of the refused chain (the fourth redirect's target is not asked for).
    assert_eq!(server.connections_so_far().await, 1 + 4 + 4);
}

#[tokio::test]
async fn redirects_and_urls_to_refused_addresses_never_connect() {
    let server = TestServer::start("127.0.0.2", IMAGE.to_vec()).await;
    let loopback = TestServer::start("127.0.0.1", IMAGE.to_vec()).await;
    let (why, text) = refusal(&server.url(&format!("/to/{}", loopback.addr)), &policy()).await;
    assert_eq!(why, FetchRefusal::NonPublicAddress(NonPublic::Loopback), "{text}");
    assert!(text.contains("host 127.0.0.1 (after 1 redirect)") && text.contains("loopback"), "{text}");
    let (why, text) = refusal(&loopback.url("/image"), &policy()).await;
    assert_eq!(why, FetchRefusal::NonPublicAddress(NonPublic::Loopback), "{text}");
    // A name is checked by every address it resolves to (localhost: 127.0.0.1 and maybe ::1).
    let by_name = format!("http://localhost:{}/image", loopback.addr.port());
    let (why, text) = refusal(&by_name, &policy()).await;
    assert_eq!(why, FetchRefusal::NonPublicAddress(NonPublic::Loopback), "{text}");
    assert_eq!(loopback.connections_so_far().await, 0, "a refused address was connected to");
    // With the addresses allowed, the name is fetched at the addresses it was checked with.
    assert_eq!(fetch_image(&by_name, &policy_allowing(&["127.0.0.1/32", "::1/128"])).await.unwrap(), IMAGE);

    let with_credentials = format!("http://user:secret@{}/image", server.addr);
    assert_eq!(refusal(&with_credentials, &policy()).await.0, FetchRefusal::Credentials);
    let started = Instant::now();
    let (why, text) = refusal("http://169.254.169.254/latest/meta-data/", &policy()).await;
    assert_eq!(why, FetchRefusal::NonPublicAddress(NonPublic::LinkLocal), "{text}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused before any connection attempt");
    assert_eq!(server.connections_so_far().await, 1, "only the redirect to 127.0.0.1 reached 127.0.0.2");
}

#[tokio::test]
async fn a_body_past_the_size_limit_is_not_read_further() {
    let server = TestServer::start("127.0.0.2", IMAGE.to_vec()).await;
    let policy = policy();
    let (why, text) = refusal(&server.url("/endless"), &policy).await;
    assert_eq!(why, FetchRefusal::TooLarge(policy.max_bytes), "{text}");
    assert!(text.contains(&format!("larger than {} bytes", policy.max_bytes)), "{text}");
    // Past the limit the server can only have filled the socket buffers: its own (one chunk) and the
    // client's receive buffer, at most tcp_rmem's maximum.
    let receive_buffer_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2).and_then(|v| v.parse::<usize>().ok()))
        .unwrap_or(6 * 1024 * 1024);
    let sent = server.endless_bytes_sent().await;
    assert!(
        sent < policy.max_bytes + receive_buffer_max + 4 * CHUNK,
        "{sent} bytes sent for a limit of {}",
        policy.max_bytes
    );
    // A declared length over the limit is refused before the body.
    let started = Instant::now();
    let (why, text) = refusal(&server.url("/declared-huge"), &policy).await;
    assert_eq!(why, FetchRefusal::TooLarge(policy.max_bytes), "{text}");
    assert!(started.elapsed() < policy.total_timeout / 2, "waited for the body: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_slow_body_hits_the_time_limit() {
    let server = TestServer::start("127.0.0.2", IMAGE.to_vec()).await;
    let policy = ImageFetchPolicy { total_timeout: Duration::from_secs(1), ..policy() };
    let started = Instant::now();
    let (why, text) = refusal(&server.url("/slow"), &policy).await;
    assert_eq!(why, FetchRefusal::TimedOut(policy.total_timeout), "{text}");
    assert!(text.contains("took longer than 1 s"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_closed_port_and_a_silent_port_read_the_same() {
    let closed = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap();
    // Bound and listening but never accepting: the kernel completes the connection, nobody answers.
    let silent = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let policy = ImageFetchPolicy { total_timeout: Duration::from_secs(1), ..policy() };
    let (closed_why, closed_text) = refusal(&format!("http://{closed}/image.png"), &policy).await;
    let (silent_why, silent_text) =
        refusal(&format!("http://{}/image.png", silent.local_addr().unwrap()), &policy).await;
    assert_eq!(closed_why, FetchRefusal::Unreachable, "{closed_text}");
    assert_eq!(silent_why, FetchRefusal::Unreachable, "{silent_text}");
    assert_eq!(closed_text, silent_text);
    assert_eq!(closed_text, "host 127.0.0.2: could not be fetched");
}

/// Through a real worker (the cli-tiny checkpoint), on the OpenAI API.
#[test]
fn a_worker_refuses_too_many_image_urls_and_answers_a_fetched_image_as_a_data_url() {
    use base64::Engine as _;
    use common::serve::{client, start, wait_ready};
    let Some(dir) = common::cli_fixtures() else { return };
    let png = std::fs::read(dir.join("images/square.png")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(TestServer::start("127.0.0.2", png.clone()));
    let worker = start(
        dir,
        &[
            "worker",
            "--model-path",
            "arcana-cli-tiny-v1",
            "--no-register",
            "--allow-image-urls",
            "--max-image-urls-per-request",
            "1",
            "--image-url-allow",
            "127.0.0.2/32",
        ],
    );
    wait_ready(&worker.url);
    let ask = |urls: &[String]| {
        let mut content = vec![json!({"type": "text", "text": "What is in this image?"})];
        content.extend(urls.iter().map(|url| json!({"type": "image_url", "image_url": {"url": url}})));
        let body = json!({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8});
        let reply = client().post(format!("{}/v1/chat/completions", worker.url)).json(&body).send().unwrap();
        (reply.status().as_u16(), reply.json::<Value>().unwrap())
    };
    let image_url = server.url("/image");
    let (status, reply) = ask(&[image_url.clone(), image_url.clone()]);
    assert_eq!(status, 400, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("2 image URLs") && message.contains("limit of 1"), "{reply}");
    assert_eq!(runtime.block_on(server.connections_so_far()), 0, "fetched before the count was checked");

    let (status, fetched) = ask(&[image_url]);
    assert_eq!(status, 200, "{fetched}");
    let data_url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    let (status, sent) = ask(&[data_url]);
    assert_eq!(status, 200, "{sent}");
    assert_eq!(fetched["choices"][0]["message"], sent["choices"][0]["message"]);
    assert_eq!(fetched["usage"], sent["usage"]);

    let (status, reply) = ask(&[format!("http://127.0.0.1:{}/image", server.addr.port())]);
    assert_eq!(status, 400, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("image 1: host 127.0.0.1: resolves to a loopback address"), "{reply}");
}
