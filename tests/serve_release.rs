//! Interop with the release's own serving code: its `arcana/serve/controller.py` (FastAPI + uvicorn, in
//! the project's Python environment) with our worker registered to it, and a request streamed through
//! it. Needs a checkout of the release named by `ARCANA_SRC` (e.g. `git archive` of syp2ysy/Arcana);
//! skips with a message without one.
mod common;

use common::serve::{client, free_port, start, wait_until, Server};

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn release_checkout() -> Option<PathBuf> {
    let dir = std::env::var_os("ARCANA_SRC").map(PathBuf::from);
    match dir {
        Some(d) if d.join("arcana/serve/controller.py").is_file() => Some(d),
        _ => {
            eprintln!("skipping: set ARCANA_SRC to a checkout of the release (arcana/serve/controller.py) to run the interop test");
            None
        }
    }
}

fn chunks(bytes: &[u8]) -> Vec<Value> {
    bytes.split(|&b| b == 0).filter(|c| !c.is_empty()).map(|c| serde_json::from_slice(c).unwrap()).collect()
}

#[test]
fn our_worker_serves_through_the_release_controller() {
    let Some(src) = release_checkout() else { return };
    let Some(dir) = common::cli_fixtures() else { return };
    let python = common::python_with_torch().expect("checked by cli_fixtures");
    let logs = tempfile::tempdir().unwrap();
    let port = free_port();
    let controller_url = format!("http://127.0.0.1:{port}");
    let _controller = Server {
        child: Command::new(&python)
            .args(["-m", "arcana.serve.controller", "--host", "127.0.0.1", "--port", &port.to_string()])
            .env("PYTHONPATH", &src)
            .current_dir(logs.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        url: controller_url.clone(),
    };
    wait_until("the release's controller", 90, || {
        client().post(format!("{controller_url}/list_models")).send().is_ok()
    });

    let _worker =
        start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &controller_url]);
    wait_until("our worker to register", 90, || {
        client()
            .post(format!("{controller_url}/list_models"))
            .send()
            .and_then(|r| r.json::<Value>())
            .is_ok_and(|v| v["models"] == json!(["arcana-cli-tiny-v1"]))
    });

    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected/v1-square-greedy.json")).unwrap()).unwrap();
    let turn = &expected["turns"][0];
    let image = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(Path::new(dir).join("images/square.png")).unwrap())
    };
    let body = json!({"model": "arcana-cli-tiny-v1", "prompt": turn["prompt"], "images": [image],
                      "temperature": 0, "max_new_tokens": 24, "stop": "</s>"});
    let reply = client().post(format!("{controller_url}/worker_generate_stream")).json(&body).send().unwrap();
    let got = chunks(&reply.bytes().unwrap());
    let last = got.last().expect("chunks");
    assert_eq!(last["error_code"], 0, "{last}");
    let prompt = turn["prompt"].as_str().unwrap();
    assert_eq!(&last["text"].as_str().unwrap()[prompt.len()..], turn["text"].as_str().unwrap());
    // The release's controller asks our worker for its status (its /worker_get_status aggregate).
    let status: Value = client().post(format!("{controller_url}/worker_get_status")).send().unwrap().json().unwrap();
    assert_eq!(status["model_names"], json!(["arcana-cli-tiny-v1"]));
}
