//! The OpenAI-compatible API against the `openai` Python client (pip, in the project's environment) on
//! the cli-tiny checkpoint: streamed and whole answers with an image, straight to a worker and routed
//! through the controller, equal the CLI reference's text; and its errors in OpenAI's shape. Skips with
//! a message where the Python environment (with `openai`) is missing.
mod common;

use common::serve::{client, start, wait_ready, Server};

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Python with the `openai` package, or a skip message.
fn python_with_openai() -> Option<std::path::PathBuf> {
    common::python_with("torch, openai")
}

const CLIENT_SCRIPT: &str = r#"
import base64, json, sys
from openai import OpenAI
base_url, image_path, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url + "/v1", api_key="unused")
url = "data:image/png;base64," + base64.b64encode(open(image_path, "rb").read()).decode()
messages = [{"role": "user", "content": [
    {"type": "text", "text": "What is in this image?"},
    {"type": "image_url", "image_url": {"url": url}}]}]
whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
pieces = []
for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24,
                                            stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
print(json.dumps({
    "models": [m.id for m in client.models.list()],
    "text": whole.choices[0].message.content,
    "finish_reason": whole.choices[0].finish_reason,
    "usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens],
    "streamed": pieces,
}))
"#;

/// A controller and a cli-tiny worker registered with it, ready to answer.
fn controller_and_worker(dir: &Path) -> (Server, Server) {
    let controller = start(dir, &["controller"]);
    let worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--controller-address", &controller.url]);
    wait_ready(&worker.url);
    common::serve::wait_registered(&controller.url, &["arcana-cli-tiny-v1"]);
    (controller, worker)
}

fn run_client(python: &Path, base_url: &str, image: &Path) -> Value {
    let out = Command::new(python)
        .args(["-c", CLIENT_SCRIPT, base_url, image.to_str().unwrap(), "arcana-cli-tiny-v1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "openai client failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_openai_client_gets_the_cli_answer_from_a_worker_and_through_the_controller() {
    let Some(dir) = common::cli_fixtures() else { return };
    let Some(python) = python_with_openai() else { return };
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected/v1-square-greedy.json")).unwrap()).unwrap();
    let expected_text = expected["turns"][0]["text"].as_str().unwrap();
    let (controller, worker) = controller_and_worker(dir);
    for base in [&worker.url, &controller.url] {
        let got = run_client(&python, base, &dir.join("images/square.png"));
        println!("{base}: {got}");
        assert_eq!(got["models"], json!(["arcana-cli-tiny-v1"]));
        assert_eq!(got["text"], expected_text, "{base}");
        assert_eq!(got["finish_reason"], "length");
        let streamed: String = got["streamed"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        assert_eq!(streamed, expected_text, "{base}: streamed text");
        assert!(got["streamed"].as_array().unwrap().len() > 1, "streamed in pieces");
        assert_eq!(got["usage"][1], 24);
        assert!(got["usage"][0].as_i64().unwrap() > 64, "image positions counted: {}", got["usage"]);
    }
}

#[test]
fn errors_come_back_in_openai_shape() {
    let Some(dir) = common::cli_fixtures() else { return };
    let (controller, worker) = controller_and_worker(dir);
    let post = |url: &str, body: Value| {
        let r = client().post(format!("{url}/v1/chat/completions")).json(&body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    let user =
        |content: Value| json!({"model": "arcana-cli-tiny-v1", "messages": [{"role": "user", "content": content}]});
    let cases = [
        (
            user(json!([{"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}}])),
            400,
            "--allow-image-urls",
        ),
        (user(json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}])), 400, "base64"),
        (json!({"model": "arcana-cli-tiny-v1", "messages": []}), 400, "`messages` is empty"),
        (
            json!({"model": "arcana-cli-tiny-v1", "messages": [{"role": "assistant", "content": "hi"}]}),
            400,
            "last message",
        ),
        (
            json!({"model": "arcana-cli-tiny-v1", "messages": [{"role": "robot", "content": "hi"}]}),
            400,
            "unsupported role",
        ),
        (json!({"model": "arcana-cli-tiny-v1", "n": 2, "messages": [{"role": "user", "content": "hi"}]}), 400, "n = 1"),
        (json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}), 404, "other"),
    ];
    for (body, status, message) in cases {
        for url in [&worker.url, &controller.url] {
            let (got_status, reply) = post(url, body.clone());
            assert_eq!(got_status, status, "{url} {body}: {reply}");
            let text = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(text.contains(message), "{url} {body}: expected `{message}` in {reply}");
        }
    }
    let r = client()
        .post(format!("{}/v1/chat/completions", worker.url))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    // A plain-text question without an image works and reports its usage.
    let (status, reply) = post(
        &controller.url,
        json!({"model": "arcana-cli-tiny-v1", "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 3);
    assert_eq!(reply["object"], "chat.completion");
}

/// A `data:` URL of a 4x4 PNG.
fn tiny_png_url() -> String {
    use base64::Engine as _;
    let mut png = Vec::new();
    image::RgbImage::new(4, 4).write_to(&mut std::io::Cursor::new(&mut png), image::ImageOutputFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

#[test]
fn requests_past_the_image_and_stop_limits_are_refused_and_the_worker_keeps_serving() {
    let Some(dir) = common::cli_fixtures() else { return };
    let worker = start(dir, &["worker", "--model-path", "arcana-cli-tiny-v1", "--no-register"]);
    wait_ready(&worker.url);
    let post = |body: Value| {
        let r = client().post(format!("{}/v1/chat/completions", worker.url)).json(&body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    let ask = |content: Value, extra: Value| {
        let mut body = json!({"model": "arcana-cli-tiny-v1", "max_tokens": 3,
                              "messages": [{"role": "user", "content": content}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    // 3000 images in one request (the issue's report: the worker grew past 24 GB decoding them).
    let image = json!({"type": "image_url", "image_url": {"url": tiny_png_url()}});
    let mut parts = vec![json!({"type": "text", "text": "What is in these images?"})];
    parts.extend(std::iter::repeat_n(image, 3000));
    let started = Instant::now();
    let (status, reply) = post(ask(Value::Array(parts), json!({})));
    assert_eq!(status, 400, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("3000 images") && message.contains("limit is 4 images per request"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10), "refused after {:?}", started.elapsed());
    let stops = |stop: Value| post(ask(json!("hi"), json!({"stop": stop})));
    let (status, reply) = stops(json!(["a", "b", "c", "d", "e"]));
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("limit is 4 stop strings"), "{reply}");
    let (status, reply) = stops(json!("x".repeat(257)));
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("limit is 256 bytes per stop string"), "{reply}");
    // Within the limits the same worker answers.
    let (status, reply) = stops(json!(["a", "b", "c", "d"]));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
}

const STRUCTURED_SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI
base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url + "/v1", api_key="unused")
schema = {"type": "object", "properties": {
    "item": {"type": "string", "maxLength": 10},
    "count": {"type": "integer", "minimum": 1, "maximum": 99},
    "colour": {"enum": ["red", "green", "blue"]}},
    "required": ["item", "count", "colour"], "additionalProperties": False}
messages = [{"role": "user", "content": "Read the receipt into JSON."}]
fmt = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": schema, "strict": True}}
out = {}
for temperature in (0, 1):
    whole = client.chat.completions.create(model=model, messages=messages, temperature=temperature, seed=3,
                                           max_tokens=200, response_format=fmt, logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    tokens = [{"token": t.token, "bytes": t.bytes, "logprob": t.logprob,
               "top": [[a.token, a.logprob] for a in t.top_logprobs]} for t in choice.logprobs.content]
    out[f"whole_{temperature}"] = {"content": choice.message.content, "finish_reason": choice.finish_reason,
                                   "tokens": tokens, "completion_tokens": whole.usage.completion_tokens}
pieces, streamed_tokens = [], 0
for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=200,
                                            response_format=fmt, stream=True, logprobs=True):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
        streamed_tokens += len(chunk.choices[0].logprobs.content)
out["streamed"] = {"content": "".join(pieces), "tokens": streamed_tokens}
obj = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=60,
                                     response_format={"type": "json_object"})
out["json_object"] = [obj.choices[0].message.content, obj.choices[0].finish_reason]
refused = []
for bad in ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}},
            {"type": "regex", "regex": "[0-9"}):
    for stream in (False, True):
        try:
            client.chat.completions.create(model=model, messages=messages, response_format=bad, stream=stream)
            refused.append("accepted")
        except openai.BadRequestError as e:
            refused.append(e.status_code)
out["refused"] = refused
print(json.dumps(out))
"#;

#[test]
fn the_openai_client_gets_schema_valid_json_and_log_probabilities() {
    let Some(dir) = common::cli_fixtures() else { return };
    let Some(python) = python_with_openai() else { return };
    let (controller, worker) = controller_and_worker(dir);
    for base in [&worker.url, &controller.url] {
        let out = Command::new(&python).args(["-c", STRUCTURED_SCRIPT, base, "arcana-cli-tiny-v1"]).output().unwrap();
        assert!(out.status.success(), "openai client failed: {}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        for temperature in [0, 1] {
            let whole = &got[format!("whole_{temperature}")];
            let content = whole["content"].as_str().unwrap();
            let value: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{base}: {e}: {content:?}"));
            assert!(value["item"].as_str().is_some_and(|s| s.chars().count() <= 10), "{value}");
            assert!(value["count"].as_i64().is_some_and(|n| (1..=99).contains(&n)), "{value}");
            assert!(["red", "green", "blue"].contains(&value["colour"].as_str().unwrap()), "{value}");
            assert_eq!(value.as_object().unwrap().len(), 3, "{value}");
            assert_eq!(whole["finish_reason"], "stop", "{base}: {whole}");
            // One entry per generated token; their bytes spell the answer (less a leading space that
            // decoding drops from the first token).
            let tokens = whole["tokens"].as_array().unwrap();
            assert_eq!(tokens.len() as i64, whole["completion_tokens"].as_i64().unwrap());
            let spelled: Vec<u8> = tokens
                .iter()
                .flat_map(|t| t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8))
                .collect();
            assert_eq!(String::from_utf8(spelled).unwrap().trim_start(), content, "{base}");
            for token in tokens {
                let logprob = token["logprob"].as_f64().unwrap();
                let top = token["top"].as_array().unwrap();
                assert!(logprob <= 0.0 && top.len() == 3, "{token}");
                assert!(top[0][1].as_f64().unwrap() >= logprob, "{token}");
                if temperature == 0 {
                    assert_eq!(top[0][1].as_f64().unwrap(), logprob, "greedy takes the most likely: {token}");
                }
            }
        }
        assert_eq!(got["streamed"]["content"], got["whole_0"]["content"], "{base}: streamed");
        assert_eq!(
            got["streamed"]["tokens"].as_u64().unwrap(),
            got["whole_0"]["tokens"].as_array().unwrap().len() as u64
        );
        // Any object admits endless strings: a whole object where the answer stopped, its start otherwise.
        let (object, reason) = (got["json_object"][0].as_str().unwrap(), &got["json_object"][1]);
        if reason == "stop" {
            assert!(serde_json::from_str::<Value>(object).unwrap().is_object(), "{base}: {object}");
        } else {
            assert!(reason == "length" && object.starts_with('{'), "{base}: {object:?} {reason}");
        }
        assert_eq!(got["refused"], json!([400, 400, 400, 400]), "{base}");
    }
}

const COMPLETIONS_SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI
base_url, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url + "/v1", api_key="unused")
whole = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=12, logprobs=2)
choice = whole.choices[0]
out = {"object": whole.object, "text": choice.text, "finish_reason": choice.finish_reason,
       "usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens],
       "tokens": choice.logprobs.tokens, "token_logprobs": choice.logprobs.token_logprobs,
       "top_logprobs": choice.logprobs.top_logprobs, "text_offset": choice.logprobs.text_offset}
default = client.completions.create(model=model, prompt=[prompt], temperature=0)
out["default_tokens"] = default.usage.completion_tokens
pieces, streamed_tokens = [], []
for chunk in client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=12, logprobs=2,
                                       stream=True):
    pieces.append(chunk.choices[0].text)
    if chunk.choices[0].logprobs:
        streamed_tokens += chunk.choices[0].logprobs.tokens
out["streamed"] = "".join(pieces)
out["streamed_tokens"] = streamed_tokens
refused = []
for bad in ({"echo": True}, {"n": 2}, {"prompt": "USER: <image> hi ASSISTANT:"}, {"logprobs": 21},
            {"prompt": ["a", "b"]}):
    args = dict(model=model, prompt=prompt, max_tokens=2) | bad
    try:
        client.completions.create(**args)
        refused.append("accepted")
    except openai.BadRequestError as e:
        refused.append(e.status_code)
print(json.dumps(out))
print(json.dumps(refused))
"#;

#[test]
fn raw_prompt_completions_answer_like_the_release_protocol_in_the_legacy_shape() {
    let Some(dir) = common::cli_fixtures() else { return };
    let Some(python) = python_with_openai() else { return };
    let (controller, worker) = controller_and_worker(dir);
    let prompt = "A chat between a curious user and an assistant. USER: Name three colours. ASSISTANT:";
    // The release protocol continues the same raw prompt: its answer is the reference.
    let release = client()
        .post(format!("{}/worker_generate_stream", worker.url))
        .json(&json!({"prompt": prompt, "temperature": 0, "max_new_tokens": 12, "logprobs": 2}))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let chunks: Vec<Value> =
        release.split(|&b| b == 0).filter(|c| !c.is_empty()).map(|c| serde_json::from_slice(c).unwrap()).collect();
    let release_text = chunks.last().unwrap()["text"].as_str().unwrap()[prompt.len()..].to_string();
    let release_logprobs: Vec<f64> = chunks
        .iter()
        .flat_map(|c| c["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()))
        .collect();
    for base in [&worker.url, &controller.url] {
        let out = Command::new(&python)
            .args(["-c", COMPLETIONS_SCRIPT, base, "arcana-cli-tiny-v1", prompt])
            .output()
            .unwrap();
        assert!(out.status.success(), "openai client failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines();
        let got: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        let refused: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(got["object"], "text_completion");
        assert_eq!(got["text"], release_text.as_str(), "{base}");
        assert_eq!(got["streamed"], release_text.as_str(), "{base}: streamed");
        let logprobs: Vec<f64> =
            got["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(logprobs, release_logprobs, "{base}");
        let tokens = got["tokens"].as_array().unwrap();
        assert_eq!(tokens.len() as u64, got["usage"][1].as_u64().unwrap());
        assert_eq!(got["streamed_tokens"].as_array().unwrap(), tokens, "{base}");
        // Each token's offset is where its text starts; the tokens spell the answer (less the leading
        // space decoding drops from the first token).
        let mut offset = 0;
        for (i, token) in tokens.iter().enumerate() {
            assert_eq!(got["text_offset"][i].as_u64().unwrap(), offset as u64);
            offset += token.as_str().unwrap().len();
            let top = got["top_logprobs"][i].as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
            assert_eq!(top[token.as_str().unwrap()].as_f64().unwrap(), logprobs[i], "greedy takes the most likely");
        }
        let spelled: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
        if got["finish_reason"] == "length" {
            assert_eq!(spelled.trim_start(), got["text"].as_str().unwrap(), "{base}");
        }
        // OpenAI's default of 16 new tokens, unless EOS came first.
        assert!(got["default_tokens"].as_u64().unwrap() <= 16);
        assert_eq!(refused, json!([400, 400, 400, 400, 400]), "{base}");
    }
}
