//! Workers keep no per-client state, so several can run behind a standard load balancer without a
//! controller: Debian's nginx (`scripts/setup-nginx.sh`) round-robins two `--no-register` workers on the
//! cli-tiny checkpoint, streams pass through, and both workers answer. Skips with a message where nginx
//! or the Python environment is missing.
mod common;

use common::serve::{client, start, wait_ready, Server};

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn nginx() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.is_file());
    if found.is_none() {
        eprintln!("skipping: nginx is not installed (scripts/setup-nginx.sh installs Debian's)");
    }
    found
}

fn requests_served(worker: &str) -> u64 {
    let text = client().get(format!("{worker}/metrics")).send().unwrap().text().unwrap();
    text.lines().find_map(|l| l.strip_prefix("arcana_requests_total ")).unwrap().parse().unwrap()
}

#[test]
fn two_workers_behind_nginx_share_the_requests() {
    let Some(nginx) = nginx() else { return };
    let Some(dir) = common::cli_fixtures() else { return };
    let workers: Vec<Server> =
        // nginx sends the upstream's name, `workers`, as the Host: the workers accept it by name.
        (0..2)
            .map(|_| {
                start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register", "--allowed-host", "workers"])
            })
            .collect();
    for worker in &workers {
        wait_ready(&worker.url);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf_dir = tempfile::tempdir().unwrap();
    let upstreams: String =
        workers.iter().map(|w| format!("        server {};\n", w.url.trim_start_matches("http://"))).collect();
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {tmp};\n    proxy_temp_path {tmp};\n\
             fastcgi_temp_path {tmp};\n    uwsgi_temp_path {tmp};\n    scgi_temp_path {tmp};\n\
             upstream workers {{\n{upstreams}    }}\n    server {{\n        listen 127.0.0.1:{port};\n\
                     client_max_body_size 32m;\n        location / {{\n            proxy_pass http://workers;\n\
                         proxy_http_version 1.1;\n            proxy_buffering off;\n        }}\n    }}\n}}\n",
        pid = conf_dir.path().join("nginx.pid").display(),
        err = conf_dir.path().join("error.log").display(),
        tmp = conf_dir.path().display(),
    );
    let conf_path = conf_dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let front = Server {
        child: Command::new(nginx)
            .args(["-c", conf_path.to_str().unwrap(), "-p", conf_dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        url: format!("http://127.0.0.1:{port}"),
    };
    wait_ready(&front.url);
    let front = front.url.clone();

    let before: Vec<u64> = workers.iter().map(|w| requests_served(&w.url)).collect();
    let body = json!({"prompt": "USER: Hello ASSISTANT:", "temperature": 0, "max_new_tokens": 8});
    let mut answers = Vec::new();
    for _ in 0..4 {
        let bytes =
            client().post(format!("{front}/worker_generate_stream")).json(&body).send().unwrap().bytes().unwrap();
        let last: Value = bytes
            .split(|&b| b == 0)
            .rfind(|c| !c.is_empty())
            .map(|c| serde_json::from_slice(c).unwrap())
            .expect("chunks through nginx");
        assert_eq!(last["error_code"], 0, "{last}");
        answers.push(last["text"].as_str().unwrap().to_string());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "greedy answers differ between workers: {answers:?}");
    let served: Vec<u64> = workers.iter().zip(&before).map(|(w, b)| requests_served(&w.url) - b).collect();
    assert_eq!(served, vec![2, 2], "round robin over both workers");
    // The OpenAI API passes through too.
    let reply: Value = client()
        .post(format!("{front}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(reply["usage"]["completion_tokens"], 4, "{reply}");
}
