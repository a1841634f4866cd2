//! Running `arcana-serve` in the server tests: child processes on loopback ports, killed on drop.
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process and the URL it printed.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Peak resident memory (VmHWM) in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

/// Starts `arcana-serve ARGS --port 0` in `dir` and waits for the address it prints first.
pub fn start(dir: &Path, args: &[&str]) -> Server {
    start_on(dir, args, 0)
}

/// Starts `arcana-serve ARGS --port PORT` (a fixed port, e.g. to restart on the same address).
pub fn start_on(dir: &Path, args: &[&str], port: u16) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arcana-serve"))
        .current_dir(dir)
        .args(args)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap_or_default().to_string();
    assert!(url.starts_with("http://"), "no address printed: {line:?}");
    Server { child, url }
}

/// A port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

/// Polls `done` every 100 ms for up to `seconds`.
pub fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {seconds} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `url/health` answers 200 (a worker's model has loaded).
/// Waits until the controller at `controller` lists exactly `models` (a worker registers after its
/// model loaded and the controller has checked it back).
pub fn wait_registered(controller: &str, models: &[&str]) {
    wait_until(&format!("{controller} to list {models:?}"), 30, || {
        client()
            .post(format!("{controller}/list_models"))
            .send()
            .and_then(|r| r.json::<serde_json::Value>())
            .is_ok_and(|listed| listed == serde_json::json!({ "models": models }))
    });
}

pub fn wait_ready(url: &str) {
    wait_until(&format!("{url}/health"), 60, || {
        client().get(format!("{url}/health")).send().is_ok_and(|r| r.status().is_success())
    });
}
