//! Constrained decoding on the cli-tiny checkpoint, whose random weights answer noise: every answer under
//! a JSON schema parses and validates against it (nested objects, arrays, enums, bounded numbers, strings
//! with patterns, required and optional fields), greedy and sampled, with and without an image; regexes
//! and Lark grammars match; a schema that cannot compile is refused before any model work; answers end at
//! the end of the structure. Both tokenizer kinds (SentencePiece and tokenizer.json) are read as bytes
//! the same way. Skips where the Python environment that makes the checkpoint is missing.
mod common;

use arcana::engine::{
    ChatMessage, Completion, Engine, EngineOptions, FinishReason, Flow, GenerationParams, ImageInput, Request,
    RequestInput,
};
use arcana::generate::constraint::{Constraint, ConstraintCompiler};
use arcana::tokenizer::{TokenSurface, Tokenizer, TokenizerKind};
use arcana::Error;
use common::cli_fixtures;
use serde_json::{json, Value};
use std::path::Path;

fn load(dir: &Path) -> Engine {
    Engine::load(&dir.join("arcana-cli-tiny-v1"), EngineOptions::default()).unwrap()
}

fn request(question: &str, image: Option<&Path>, params: GenerationParams) -> Request {
    Request {
        input: RequestInput::Conversation(vec![ChatMessage::user_with_images(question, usize::from(image.is_some()))]),
        images: image.into_iter().map(|path| ImageInput::File(path.to_path_buf())).collect(),
        params,
    }
}

fn answer(engine: &Engine, request: &Request) -> Completion {
    engine.generate(request, |_| Flow::Continue).unwrap()
}

fn constrained(constraint: Constraint, sampled: bool) -> GenerationParams {
    GenerationParams {
        max_new_tokens: 300,
        temperature: if sampled { 1.0 } else { 0.0 },
        top_k: Some(0),
        top_p: Some(1.0),
        seed: Some(7),
        constraint: Some(constraint),
        ..GenerationParams::default()
    }
}

/// The schemas: each keeps strings and numbers bounded, so that an answer of noise must still end.
fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "member": {"type": "boolean"}},
            "required": ["name", "age", "member"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "receipt": {"type": "object", "properties": {
                "shop": {"type": "string", "maxLength": 10},
                "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
                    "what": {"type": "string", "maxLength": 8},
                    "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["what", "count"], "additionalProperties": false}}},
                "required": ["shop", "items"], "additionalProperties": false}},
            "required": ["receipt"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "shades": {"type": "array", "items": {"enum": ["light", "dark"]}, "maxItems": 2}},
            "required": ["colour", "shades"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "note": {"type": "string", "maxLength": 6}},
            "required": ["code"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -50, "maximum": 50},
            "y": {"type": "integer", "minimum": 0, "maximum": 9},
            "label": {"type": "string", "enum": ["a", "b"]}},
            "required": ["x", "y"], "additionalProperties": false}),
        json!({"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "boolean"}}),
        json!({"enum": ["yes", "no", "maybe"]}),
    ]
}

/// The JSON-schema keywords the schemas above use, checked by hand.
fn validate(value: &Value, schema: &Value, at: &str) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{at}: {why} ({value})"));
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return fail("not one of the enum");
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(object) = value.as_object() else { return fail("not an object") };
            let properties = schema["properties"].as_object().unwrap();
            for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !object.contains_key(required.as_str().unwrap()) {
                    return fail(&format!("missing {required}"));
                }
            }
            for (key, item) in object {
                match properties.get(key) {
                    Some(sub) => validate(item, sub, &format!("{at}.{key}"))?,
                    None if schema["additionalProperties"] == json!(false) => return fail(&format!("extra {key}")),
                    None => {}
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else { return fail("not an array") };
            let count = items.len() as u64;
            if schema.get("minItems").and_then(Value::as_u64).is_some_and(|min| count < min)
                || schema.get("maxItems").and_then(Value::as_u64).is_some_and(|max| count > max)
            {
                return fail("wrong number of items");
            }
            for (i, item) in items.iter().enumerate() {
                validate(item, &schema["items"], &format!("{at}[{i}]"))?;
            }
        }
        Some("integer") => {
            let Some(n) = value.as_i64() else { return fail("not an integer") };
            if schema.get("minimum").and_then(Value::as_i64).is_some_and(|min| n < min)
                || schema.get("maximum").and_then(Value::as_i64).is_some_and(|max| n > max)
            {
                return fail("out of range");
            }
        }
        Some("string") => {
            let Some(text) = value.as_str() else { return fail("not a string") };
            if schema.get("maxLength").and_then(Value::as_u64).is_some_and(|max| text.chars().count() as u64 > max) {
                return fail("too long");
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                if !regex::Regex::new(pattern).unwrap().is_match(text) {
                    return fail("does not match its pattern");
                }
            }
        }
        Some("boolean") if !value.is_boolean() => return fail("not a boolean"),
        _ => {}
    }
    Ok(())
}

fn ends_with_the_structure(completion: &Completion) {
    assert!(
        matches!(completion.finish.reason, FinishReason::Complete | FinishReason::Eos),
        "the answer ran to {:?}: {:?}",
        completion.finish.reason,
        completion.text
    );
}

#[test]
fn every_answer_under_a_schema_validates_greedy_and_sampled_with_and_without_an_image() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(dir);
    let image = dir.join("images/square.png");
    // Without a constraint the model answers noise: the constraint does all the work.
    let free = answer(&engine, &request("Describe the receipt as JSON.", None, GenerationParams::default()));
    assert!(serde_json::from_str::<Value>(&free.text).is_err(), "unconstrained answer parsed: {:?}", free.text);
    for (i, schema) in schemas().into_iter().enumerate() {
        for (sampled, with_image) in [(false, false), (true, false), (false, true), (true, true)] {
            let params = constrained(Constraint::JsonSchema(schema.clone()), sampled);
            let image = with_image.then_some(image.as_path());
            let completion = answer(&engine, &request("Describe the receipt as JSON.", image, params));
            let case = format!("schema {i}, sampled {sampled}, image {with_image}");
            ends_with_the_structure(&completion);
            let value: Value = serde_json::from_str(completion.text.trim_start())
                .unwrap_or_else(|e| panic!("{case}: {e}: {:?}", completion.text));
            validate(&value, &schema, "$").unwrap_or_else(|e| panic!("{case}: {e}"));
        }
    }
}

#[test]
fn any_json_object_regexes_and_grammars_are_followed() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(dir);
    let call_shape = regex::Regex::new(r"^(add\([0-9]{1,3}, [0-9]{1,3}\)|neg\([0-9]{1,3}\))$").unwrap();
    for sampled in [false, true] {
        // Any object admits strings without end, which a model of noise may never close: the answer is an
        // object where it ends, and the start of one where it runs out of tokens.
        let params = GenerationParams { max_new_tokens: 60, ..constrained(Constraint::JsonObject, sampled) };
        let object = answer(&engine, &request("Give me JSON.", None, params));
        if object.finish.reason == FinishReason::Length {
            assert!(object.text.trim_start().starts_with('{'), "{:?}", object.text);
        } else {
            ends_with_the_structure(&object);
            let value: Value = serde_json::from_str(object.text.trim_start()).unwrap();
            assert!(value.is_object(), "{value}");
        }

        let regex = "[0-9]{3}-[a-z]{2,5}";
        let code = answer(&engine, &request("A code?", None, constrained(Constraint::Regex(regex.into()), sampled)));
        assert!(regex::Regex::new(&format!("^{regex}$")).unwrap().is_match(&code.text), "{code:?}", code = code.text);

        let lark = r#"
            start: call
            call: "add(" INT ", " INT ")" | "neg(" INT ")"
            INT: /[0-9]{1,3}/
        "#;
        let call = answer(&engine, &request("A call?", None, constrained(Constraint::Lark(lark.into()), sampled)));
        ends_with_the_structure(&call);
        assert!(call_shape.is_match(&call.text), "{:?}", call.text);
    }
}

#[test]
fn a_constraint_that_cannot_compile_is_refused_before_any_model_work() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(dir);
    let bad = [
        (Constraint::JsonSchema(json!({"type": "strin"})), "strin"),
        (Constraint::JsonSchema(json!({"$ref": "#/$defs/missing"})), "missing"),
        (Constraint::JsonSchema(json!({"type": "string", "minLength": 5, "maxLength": 2})), "minLength"),
        (Constraint::Regex("[0-9".into()), "regex"),
        (Constraint::Lark("start: nothing_here".into()), "nothing_here"),
    ];
    for (constraint, named) in bad {
        // A missing image file shows that nothing after the constraint ran: no image was read.
        let params = constrained(constraint.clone(), false);
        let request = request("Hi", Some(Path::new("/nonexistent/image.png")), params);
        let mut events = 0;
        let error = engine.generate(&request, |_| {
            events += 1;
            Flow::Continue
        });
        match error {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains(named) && message.contains("cannot be used"), "{constraint:?}: {message}")
            }
            other => panic!("{constraint:?}: {other:?}"),
        }
        assert_eq!(events, 0, "{constraint:?}: the answer started");
    }
}

/// Random logits through a constraint's masks, with the vocabulary of `tokenizer`: the bytes of the
/// chosen tokens are the text the constraint admits.
fn random_walk(tokenizer: &Tokenizer, width: usize, eos: i64, constraint: &Constraint, seed: i64) -> String {
    tch::manual_seed(seed);
    let compiler = ConstraintCompiler::new(tokenizer, width, eos).unwrap();
    let mut matcher = compiler.compile(constraint).unwrap();
    let mut bytes = Vec::new();
    for _ in 0..400 {
        let logits = tch::Tensor::randn([1, width as i64], (tch::Kind::Float, tch::Device::Cpu));
        let masked = matcher.mask(&logits).unwrap().expect("a token is allowed");
        let id = masked.argmax(-1, false).int64_value(&[0]);
        if id == eos {
            break;
        }
        match tokenizer.token_surface(id as u32).unwrap() {
            TokenSurface::Bytes(token) => bytes.extend(token),
            TokenSurface::Special(text) => panic!("special token {text} inside the text"),
        }
        if matcher.advance(id).unwrap() == arcana::generate::constraint::Progress::Complete {
            break;
        }
    }
    String::from_utf8(bytes).unwrap()
}

#[test]
fn both_tokenizer_kinds_spell_constrained_text_with_their_bytes() {
    let Some(dir) = cli_fixtures() else { return };
    let folder = dir.join("arcana-cli-tiny-v1");
    // The same vocabulary as tokenizer.json, written by transformers' converter.
    let fast = tempfile::tempdir().unwrap();
    let Some(python) = common::python_with("transformers, sentencepiece, tokenizers") else { return };
    let convert = "import sys; from transformers import LlamaTokenizerFast; \
                   LlamaTokenizerFast.from_pretrained(sys.argv[1], from_slow=True).save_pretrained(sys.argv[2])";
    let out = std::process::Command::new(python).args(["-c", convert]).arg(&folder).arg(fast.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(fast.path().join("tokenizer.model")).ok();
    let schema = schemas().swap_remove(1);
    let non_ascii = regex::Regex::new("^(é|ü|日本){1,4}$").unwrap();
    for (kind, folder) in [(TokenizerKind::Slow, folder.as_path()), (TokenizerKind::Fast, fast.path())] {
        let tokenizer = Tokenizer::from_folder_as(folder, kind).unwrap();
        assert_eq!(tokenizer.kind(), kind);
        let eos = tokenizer.eos_id().unwrap() as i64;
        for seed in 0..4 {
            let text = random_walk(&tokenizer, 32000, eos, &Constraint::JsonSchema(schema.clone()), seed);
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{kind:?}: {e}: {text:?}"));
            validate(&value, &schema, "$").unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            // Non-ASCII text comes through byte-fallback pieces and multi-byte pieces alike.
            let text = random_walk(&tokenizer, 32000, eos, &Constraint::Regex("(é|ü|日本){1,4}".into()), seed);
            assert!(non_ascii.is_match(&text), "{kind:?}: {text:?}");
        }
    }
}
