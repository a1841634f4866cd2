//! The serving loop's limits over real sockets on loopback (`arcana::serve::http::serve_with`): a
//! client that stops reading is disconnected after the idle timeout (and its reply stream dropped),
//! having taken a bounded part of the reply; a client that never finishes its headers is disconnected
//! after the header timeout, connections past the cap are closed at once, slow handlers get 408, and
//! bodies over the limit 413.
use arcana::serve::http::{self, ServeLimits, ServeOptions};
use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the server did with the `/endless` reply: the bytes it took from the stream, and whether it
/// has let go of the stream.
#[derive(Default)]
struct ReplyProbe {
    taken: AtomicUsize,
    dropped: AtomicBool,
}

/// Sets the probe's flag when dropped: the server let go of the reply stream that owns it.
struct DropFlag(Arc<ReplyProbe>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.dropped.store(true, Ordering::SeqCst);
    }
}

fn app(probe: Arc<ReplyProbe>) -> Router {
    Router::new()
        .route(
            "/endless",
            get(move || {
                let flag = DropFlag(probe.clone());
                async move {
                    // Pieces about the size of a long answer's chunks.
                    let piece = bytes::Bytes::from(vec![b'x'; 4 * 1024]);
                    let body = futures_util::stream::unfold(flag, move |flag| {
                        let piece = piece.clone();
                        flag.0.taken.fetch_add(piece.len(), Ordering::SeqCst);
                        async move { Some((Ok::<_, std::io::Error>(piece), flag)) }
                    });
                    Body::from_stream(body)
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route("/echo", post(|body: String| async move { body }))
        .route(
            "/trickle",
            get(|| async {
                // Silent for longer than the header timeout, then a piece every 300 ms.
                let body = futures_util::stream::unfold(0, |i| async move {
                    if i == 4 {
                        return None;
                    }
                    let pause = if i == 0 { 1500 } else { 300 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(format!("piece {i}\n"))), i + 1))
                });
                Body::from_stream(body)
            }),
        )
        .route("/health", get(|| async { "ok" }))
}

/// Serves `app` with `limits` on a runtime of its own; returns the address.
fn serve(limits: ServeLimits, probe: Arc<ReplyProbe>) -> std::net::SocketAddr {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let (listener, addr) = http::bind("127.0.0.1", 0).await.unwrap();
            sender.send(addr).unwrap();
            let options = ServeOptions { limits, ..Default::default() };
            http::serve_with(listener, app(probe), options).await.unwrap();
        });
    });
    receiver.recv().unwrap()
}

fn limits() -> ServeLimits {
    ServeLimits {
        max_body_bytes: 1024,
        max_connections: 4,
        header_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_millis(700),
        max_unsent_bytes: http::MAX_UNSENT_BYTES,
    }
}

/// Reads until the server closes the connection or `limit` passes; true when it closed.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + limit;
    let mut buffer = [0u8; 65536];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn get_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    reqwest::blocking::get(format!("http://{addr}{path}")).map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Opens `/endless` and never reads; returns the bytes the server took from the reply stream by the
/// time it let go of it.
fn taken_by_a_client_that_never_reads(limits: ServeLimits) -> usize {
    let probe = Arc::new(ReplyProbe::default());
    let addr = serve(limits, probe.clone());
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /endless HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    // Never read: the socket buffers fill, the server's writes stall, and after the idle timeout it
    // gives up on the connection and drops the reply stream (which cancels an answer in a worker).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe.dropped.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the stalled reply was never dropped");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get_status(addr, "/health"), 200);
    probe.taken.load(Ordering::SeqCst)
}

#[test]
fn a_client_that_stops_reading_is_dropped_after_the_idle_timeout() {
    taken_by_a_client_that_never_reads(limits());
}

/// The kernel grows a connection's send buffer to megabytes by itself (tcp_wmem), enough to hold a whole
/// long answer of cumulative release chunks: a client that never read would cost that whole answer and
/// never be seen to stall. The unsent bytes queued for it are capped instead.
#[test]
fn a_client_that_never_reads_takes_a_bounded_part_of_the_reply() {
    let taken = taken_by_a_client_that_never_reads(limits());
    // Its receive window (about 128 KiB by default), the capped unsent bytes and hyper's own buffer.
    assert!(taken < 512 * 1024, "the server took {taken} bytes of the reply for a client that never read");
}

#[test]
fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let addr = serve(limits(), Arc::default());
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0").unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(5)), "a half-sent request held its connection");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed before the header timeout");
    // An idle connection that sends nothing at all goes too.
    let mut idle = TcpStream::connect(addr).unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(5)), "an idle connection was kept");
}

#[test]
fn a_slow_reply_outlives_the_header_timeout() {
    let addr = serve(ServeLimits { request_timeout: Duration::from_secs(5), ..limits() }, Arc::default());
    let text = reqwest::blocking::get(format!("http://{addr}/trickle")).unwrap().text().unwrap();
    assert_eq!(text, "piece 0\npiece 1\npiece 2\npiece 3\n");
}

#[test]
fn a_body_announced_over_the_limit_is_refused_before_it_is_sent() {
    let addr = serve(limits(), Arc::default());
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 4000000000\r\n\r\n{").unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply).unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&reply[..n]).starts_with("HTTP/1.1 413"),
        "{:?}",
        String::from_utf8_lossy(&reply[..n])
    );
}

#[test]
fn connections_past_the_cap_are_closed_and_the_rest_still_served() {
    let addr = serve(ServeLimits { header_timeout: Duration::from_secs(30), ..limits() }, Arc::default());
    // Four connections held open without a request fill the cap.
    let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(addr).unwrap();
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(closed_within(&mut extra, Duration::from_secs(3)), "a fifth connection was served");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_status(addr, "/health") != 200 {
        assert!(Instant::now() < deadline, "the freed connections were not reused");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn slow_handlers_time_out_and_large_bodies_are_refused() {
    let addr = serve(limits(), Arc::default());
    let started = Instant::now();
    let reply = reqwest::blocking::get(format!("http://{addr}/slow")).unwrap();
    assert_eq!(reply.status(), 408);
    assert!(reply.text().unwrap().contains("--request-timeout"));
    assert!(started.elapsed() < Duration::from_secs(10));
    let client = reqwest::blocking::Client::new();
    let small = client.post(format!("http://{addr}/echo")).body("x".repeat(1000)).send().unwrap();
    assert_eq!(small.status(), 200);
    let large = client.post(format!("http://{addr}/echo")).body("x".repeat(1025)).send().unwrap();
    assert_eq!(large.status(), 413);
}
