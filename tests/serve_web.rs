//! `arcana-serve web` and `arcana-serve all` over real HTTP. The page's API explains an empty model
//! list, a missing worker and an unreachable controller, and refuses malformed requests with JSON
//! errors; in headless Chromium (playwright-core driving Debian's chromium, installed by
//! scripts/setup-browser.sh) the page uploads an image, streams an answer, regenerates, votes, asks
//! again and clears, and the release's log lines and saved image are written. The browser test skips
//! with a message where chromium, node or playwright-core is missing, or without the Python
//! environment that makes the cli-tiny checkpoint.
mod common;

use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `arcana-serve` with the addresses it printed ("NAME listening on URL").
struct Servers {
    child: Child,
    urls: Vec<(String, String)>,
}

impl Servers {
    fn url(&self, name: &str) -> &str {
        &self.urls.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} in {:?}", self.urls)).1
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `arcana-serve ARGS` in `dir` and reads `count` address lines.
fn start(dir: &Path, args: &[&str], count: usize) -> Servers {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arcana-serve"))
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut urls = Vec::new();
    for _ in 0..count {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut words = line.split_whitespace();
        let (Some(name), Some(url)) = (words.next(), words.last()) else { panic!("no address printed: {line:?}") };
        assert!(url.starts_with("http://"), "no address printed: {line:?}");
        urls.push((name.to_string(), url.to_string()));
    }
    Servers { child, urls }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

fn get_json(url: &str) -> Value {
    client().get(url).send().unwrap().json().unwrap()
}

/// The JSON lines of a chat answer.
fn chat(web: &str, body: &Value) -> (u16, Vec<Value>) {
    let response = client().post(format!("{web}/api/chat")).json(body).send().unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    if status != 200 {
        return (status, vec![serde_json::from_str(&text).unwrap()]);
    }
    (status, text.lines().map(|line| serde_json::from_str(line).unwrap()).collect())
}

fn question(model: &str) -> Value {
    json!({"model": model, "messages": [["Hello?", null]], "new_message": true, "temperature": 0, "max_new_tokens": 8})
}

#[test]
fn the_api_explains_missing_models_workers_and_controllers() {
    let logs = tempfile::tempdir().unwrap();
    let log_dir = logs.path().to_str().unwrap();
    let controller = start(logs.path(), &["controller", "--port", "0"], 1);
    let web = start(
        logs.path(),
        &[
            "web",
            "--port",
            "0",
            "--controller-url",
            controller.url("controller"),
            "--log-dir",
            log_dir,
            "--stream-timeout",
            "1",
        ],
        1,
    );
    let web_url = web.url("web");

    let page = client().get(format!("{web_url}/")).send().unwrap().text().unwrap();
    assert!(page.contains("<select id=\"model\"") && page.contains("/app.js"), "{page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page must not load anything remote");
    let example = client().get(format!("{web_url}/examples/waterview.png")).send().unwrap();
    assert_eq!(example.headers()["content-type"], "image/png");

    // No worker yet: an empty list, explained.
    let models = get_json(&format!("{web_url}/api/models"));
    assert_eq!(models["models"], json!([]));
    assert!(models["notice"].as_str().unwrap().contains("lists no worker"), "{models}");
    assert_eq!(models["examples"].as_array().unwrap().len(), 2);

    let (status, events) = chat(web_url, &question("arcana-x"));
    assert_eq!(status, 200);
    assert_eq!(events[0]["type"], "start");
    assert_eq!(events[0]["template"], "vicuna_v1");
    let error = events.last().unwrap();
    assert_eq!(error["type"], "error", "{events:?}");
    assert!(error["message"].as_str().unwrap().starts_with("no worker serves model arcana-x"), "{error}");

    // Malformed requests get 4xx JSON errors naming the problem.
    let bad_json = client()
        .post(format!("{web_url}/api/chat"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .unwrap();
    assert_eq!(bad_json.status(), 400);
    assert!(bad_json.json::<Value>().unwrap()["error"].is_string());
    let mut with_bad_image = question("arcana-x");
    with_bad_image["image"] = json!("data:image/png;base64,%%%");
    let (status, reply) = chat(web_url, &with_bad_image);
    assert_eq!(status, 400);
    assert!(reply[0]["error"].as_str().unwrap().contains("not valid base64"), "{reply:?}");
    let (status, reply) = chat(web_url, &json!({"model": "m", "messages": []}));
    assert_eq!(status, 400, "{reply:?}");
    let vote = client()
        .post(format!("{web_url}/api/vote"))
        .json(&json!({"type": "like", "model": "m", "template": "vicuna_v1", "messages": []}))
        .send()
        .unwrap();
    assert_eq!(vote.status(), 400);

    // A worker that gives its status but never answers a request: the page is told how long it waited.
    let silent_url = silent_worker("silent");
    let registered = client()
        .post(format!("{}/register_worker", controller.url("controller")))
        .json(&json!({"worker_name": silent_url, "check_heart_beat": false,
                      "worker_status": {"model_names": ["silent"], "speed": 1, "queue_length": 0}}))
        .send()
        .unwrap();
    assert!(registered.status().is_success());
    let (_, events) = chat(web_url, &question("silent"));
    let timeout = events.last().unwrap()["message"].as_str().unwrap().to_string();
    assert_eq!(timeout, "the worker serving model silent sent nothing for 1 s");

    // A controller that is gone is named.
    drop(controller);
    let models = get_json(&format!("{web_url}/api/models"));
    assert!(models["error"].as_str().unwrap().contains("is unreachable"), "{models}");
    let (_, events) = chat(web_url, &question("arcana-x"));
    assert!(events.last().unwrap()["message"].as_str().unwrap().contains("is unreachable"), "{events:?}");
}

#[test]
fn flags_that_need_remote_services_are_refused() {
    for (flag, cause) in [("--moderate", "remote service"), ("--share", "Gradio's servers")] {
        let out = Command::new(env!("CARGO_BIN_EXE_arcana-serve")).args(["web", "--port", "0", flag]).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag) && stderr.contains(cause), "{stderr}");
    }
}

#[test]
fn worker_errors_reach_the_page_with_their_text() {
    let Some(dir) = common::cli_fixtures() else { return };
    let servers = start(
        dir,
        &["all", "--model-path", "arcana-cli-tiny-v1", "--port", "0", "--controller-port", "0", "--worker-port", "0"],
        3,
    );
    let web_url = servers.url("web");
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_json(&format!("{web_url}/api/models"))["models"] == json!([]) {
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A marker without an image: the worker's own message, with the worker named.
    let mut body = question("arcana-cli-tiny-v1");
    body["messages"] = json!([["<image> what is this?", null]]);
    let (_, events) = chat(web_url, &body);
    let message = events.last().unwrap()["message"].as_str().unwrap();
    assert!(message.starts_with("the worker serving model arcana-cli-tiny-v1 failed: "), "{message}");
    assert!(!message.contains(servers.url("worker")), "{message}");
    assert!(message.contains("Number of images does not match number of <image> tokens"), "{message}");
    assert!(message.ends_with("(error_code 1)"), "{message}");
    // Without the marker the same request answers.
    body["messages"] = json!([["what is this?", null]]);
    let (_, events) = chat(web_url, &body);
    assert_eq!(events.last().unwrap()["type"], "done", "{events:?}");
}

/// node, playwright-core's folder and chromium, or why the browser test cannot run.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("ARCANA_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    if !chromium.is_file() {
        return Err(format!("no chromium at {} (run scripts/setup-browser.sh)", chromium.display()));
    }
    let node_ok = Command::new("node").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !node_ok {
        return Err("no node (install nodejs and npm, then run scripts/setup-browser.sh)".into());
    }
    let folder = std::env::var_os("ARCANA_BROWSER_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/arcana/browser")))
        .unwrap_or_default()
        .join("node_modules/playwright-core");
    if !folder.join("package.json").is_file() {
        return Err(format!("no playwright-core in {} (run scripts/setup-browser.sh)", folder.display()));
    }
    Ok((chromium, folder))
}

fn log_lines(dir: &Path) -> Vec<Value> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with("-conv.json") {
            let text = std::fs::read_to_string(&path).unwrap();
            lines.extend(text.lines().map(|line| serde_json::from_str::<Value>(line).unwrap()));
        }
    }
    lines
}

#[test]
fn the_page_chats_in_headless_chromium_and_logs_like_the_release() {
    let (chromium, playwright) = match browser_tools() {
        Ok(tools) => tools,
        Err(why) => {
            eprintln!("skipping the browser test: {why}");
            return;
        }
    };
    let Some(dir) = common::cli_fixtures() else { return };
    let logs = tempfile::tempdir().unwrap();
    let servers = start(
        dir,
        &[
            "all",
            "--model-path",
            "arcana-cli-tiny-v1",
            "--port",
            "0",
            "--controller-port",
            "0",
            "--worker-port",
            "0",
            "--log-dir",
            logs.path().to_str().unwrap(),
        ],
        3,
    );
    let web_url = servers.url("web").to_string();
    // The page itself waits for the model list; this only bounds the start-up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_json(&format!("{web_url}/api/models"))["models"] == json!([]) {
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(200));
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web/chat_page.cjs");
    let image = dir.join("images/wide.png");
    let mut command = Command::new("node");
    command.arg(&script).arg(&web_url).arg(&image);
    // ARCANA_SCREENSHOTS=docs makes the README's screenshots.
    if let Some(shots) = std::env::var_os("ARCANA_SCREENSHOTS") {
        command.arg(shots);
    }
    let out = command.env("ARCANA_PLAYWRIGHT", &playwright).env("ARCANA_CHROMIUM", &chromium).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("browser saw: {seen}");
    assert_eq!(seen["models"], json!(["arcana-cli-tiny-v1"]));
    assert!(seen["streamedWithCursor"].as_u64().unwrap() >= 2);
    assert_eq!(seen["userImageShown"], true);

    // The release's log lines: three answers and three votes, with the image's md5 and the state.
    let lines = log_lines(logs.path());
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["chat", "chat", "upvote", "chat", "downvote", "chat", "flag"], "{lines:?}");
    let first = &lines[0];
    assert_eq!(first["model"], "arcana-cli-tiny-v1");
    assert_eq!(first["ip"], "127.0.0.1");
    assert!(first["start"].as_f64().unwrap() <= first["finish"].as_f64().unwrap());
    assert_eq!(first["state"]["messages"][0], json!(["USER", "What is in this image?\n<image>"]));
    assert_eq!(first["state"]["messages"][1][1], seen["first"]);
    let md5 = first["images"][0].as_str().unwrap();
    assert_eq!(md5.len(), 32);
    let saved: Vec<PathBuf> = std::fs::read_dir(logs.path().join("serve_images"))
        .unwrap()
        .flat_map(|day| std::fs::read_dir(day.unwrap().path()).unwrap().map(|f| f.unwrap().path()))
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(saved[0].ends_with(format!("{md5}.jpg")));
    let last_chat = &lines[5];
    assert_eq!(last_chat["state"]["messages"].as_array().unwrap().len(), 6);
    assert_eq!(lines[6]["state"], last_chat["state"]);
}

/// A worker on loopback that answers `/worker_get_status` for `model` and holds every other request
/// open without a reply; returns its URL.
fn silent_worker(model: &str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let status = json!({"model_names": [model], "speed": 1, "queue_length": 0}).to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let n = stream.read(&mut request).unwrap_or(0);
            if String::from_utf8_lossy(&request[..n]).contains("/worker_get_status") {
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{status}",
                    status.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            } else {
                held.push(stream);
            }
        }
    });
    url
}

#[test]
fn an_upload_whose_padded_square_passes_the_pixel_limit_is_refused_before_decoding() {
    use base64::Engine as _;
    let logs = tempfile::tempdir().unwrap();
    let controller = start(logs.path(), &["controller", "--port", "0"], 1);
    let args = ["web", "--port", "0", "--controller-url", controller.url("controller")];
    let limit = ["--max-image-pixels", "1000000", "--log-dir", logs.path().to_str().unwrap()];
    let web = start(logs.path(), &[&args[..], &limit].concat(), 1);
    // 4000x2: 8000 pixels, 16 million once padded to a square (the 60000x2 PNG of 1.2 KB took
    // 10.6 GB this way).
    let mut png = Vec::new();
    image::RgbImage::new(4000, 2).write_to(&mut std::io::Cursor::new(&mut png), image::ImageOutputFormat::Png).unwrap();
    let mut request = question("arcana-x");
    request["image"] = json!(base64::engine::general_purpose::STANDARD.encode(&png));
    request["image_process_mode"] = json!("Pad");
    let (status, reply) = chat(web.url("web"), &request);
    assert_eq!(status, 400, "{reply:?}");
    let message = reply[0]["error"].as_str().unwrap();
    assert!(message.contains("4000x4000 = 16000000 pixels") && message.contains("limit of 1000000"), "{message}");
    // Not padded, the same image is within the limit (and the chat goes on to say no worker serves it).
    request["image_process_mode"] = json!("Crop");
    let (status, events) = chat(web.url("web"), &request);
    assert_eq!(status, 200, "{events:?}");
}
