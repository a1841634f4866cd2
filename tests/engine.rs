//! The engine on the cli-tiny checkpoints made by `python parity/cli_fixtures.py` (see tests/cli.rs):
//! its answers equal the Python reference of the release's CLI, it ends for EOS, length, stop strings
//! and cancellation as asked, refuses a prompt past the context, and serves two threads through a handle.
//! The tests skip with a message where the project's Python environment is missing.
mod common;

use arcana::engine::{
    ChatMessage, Completion, Engine, EngineOptions, Event, FinishReason, Flow, GenerationParams, ImageInput, Request,
    RequestInput,
};
use arcana::Error;
use common::{cli_fixtures, copy_dir, copy_with_context};
use serde_json::Value;
use std::path::Path;

const QUESTION: &str = "What is in this image?";

/// The reference's first turn of a case in `expected/`.
fn expected_turn(dir: &Path, case: &str) -> Value {
    let text = std::fs::read_to_string(dir.join("expected").join(format!("{case}.json"))).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["turns"][0].clone()
}

fn ids(value: &Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

fn load(model: &Path) -> Engine {
    Engine::load(model, EngineOptions::default()).unwrap()
}

/// The CLI's first turn: the question with the square image, greedy.
fn square_request(dir: &Path, params: GenerationParams) -> Request {
    Request {
        input: RequestInput::Conversation(vec![ChatMessage::user_with_images(QUESTION, 1)]),
        images: vec![ImageInput::File(dir.join("images/square.png"))],
        params,
    }
}

fn greedy(max_new_tokens: usize) -> GenerationParams {
    GenerationParams { max_new_tokens, ..GenerationParams::default() }
}

/// Answers `request`, checking the order of the events and that they add up to the completion.
fn answer(engine: &Engine, request: &Request) -> (Completion, Vec<Event>) {
    let mut events = Vec::new();
    let completion = engine
        .generate(request, |event| {
            events.push(event);
            Flow::Continue
        })
        .unwrap();
    check_events(&events, &completion);
    (completion, events)
}

fn check_events(events: &[Event], completion: &Completion) {
    assert!(matches!(events.first(), Some(Event::Started(_))), "{events:?}");
    assert!(matches!(events.last(), Some(Event::Finished(_))), "{events:?}");
    let tokens: Vec<i64> =
        events.iter().filter_map(|e| if let Event::Token(id) = e { Some(*id) } else { None }).collect();
    let text: String =
        events.iter().filter_map(|e| if let Event::Text(t) = e { Some(t.as_str()) } else { None }).collect();
    assert_eq!(tokens, completion.output_ids);
    assert_eq!(text, completion.text);
    assert_eq!(completion.finish.usage.completion_tokens, tokens.len());
}

#[test]
fn a_greedy_conversation_streams_the_answer_of_the_cli_reference() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(&dir.join("arcana-cli-tiny-v1"));
    let expected = expected_turn(dir, "v1-square-greedy");
    let (completion, events) = answer(&engine, &square_request(dir, greedy(24)));
    assert_eq!(completion.prompt.prompt, expected["prompt"].as_str().unwrap());
    assert_eq!(completion.prompt.input_ids, ids(&expected["input_ids"]));
    // The reference's ids start with the BOS that transformers' generate puts in front.
    assert_eq!(completion.output_ids, ids(&expected["output_ids"])[1..]);
    assert_eq!(completion.text, expected["text"].as_str().unwrap());
    assert_eq!(completion.finish.reason, FinishReason::Length);
    assert_eq!(completion.finish.usage.prompt_tokens as i64, expected["prefill_len"].as_i64().unwrap());
    assert!(events.iter().filter(|e| matches!(e, Event::Text(_))).count() > 1, "the text comes in pieces");

    // The same prompt given already templated, with its image: the same answer.
    let raw = Request {
        input: RequestInput::Prompt(completion.prompt.prompt.clone()),
        images: vec![ImageInput::Pixels(engine.preprocess_image(&dir.join("images/square.png")).unwrap())],
        params: greedy(24),
    };
    let (raw_completion, _) = answer(&engine, &raw);
    assert_eq!(raw_completion.output_ids, completion.output_ids);
    assert_eq!(raw_completion.text, completion.text);
}

#[test]
fn greedy_log_probabilities_equal_the_references_to_the_bit() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(&dir.join("arcana-cli-tiny-v1"));
    let expected = expected_turn(dir, "v1-square-greedy");
    let params = GenerationParams { logprobs: Some(5), ..greedy(24) };
    let (completion, events) = answer(&engine, &square_request(dir, params));
    let reference = expected["greedy_logprobs"].as_array().expect("the reference exports greedy_logprobs");
    assert_eq!(completion.logprobs.len(), completion.output_ids.len());
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Logprobs(_))).count(), completion.output_ids.len());
    assert_eq!(reference.len(), completion.logprobs.len());
    for (step, (got, want)) in completion.logprobs.iter().zip(reference).enumerate() {
        assert_eq!(got.chosen.id, want["id"].as_i64().unwrap(), "step {step}");
        // Python's float of a float32 round-trips through f64 to the same f32.
        assert_eq!(got.chosen.logprob.to_bits(), (want["logprob"].as_f64().unwrap() as f32).to_bits(), "step {step}");
        let want_top: Vec<(i64, f32)> = want["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| (pair[0].as_i64().unwrap(), pair[1].as_f64().unwrap() as f32))
            .collect();
        let got_top: Vec<(i64, f32)> = got.top.iter().map(|t| (t.id, t.logprob)).collect();
        assert_eq!(got_top, want_top, "step {step}");
        assert_eq!(got.top[0].id, got.chosen.id, "greedy takes the most likely token");
        let surface = engine.tokenizer().token_surface(got.chosen.id as u32).unwrap();
        assert!(matches!(&surface, arcana::tokenizer::TokenSurface::Bytes(b) if *b == got.chosen.bytes), "{surface:?}");
    }
}

#[test]
fn a_seeded_sampled_request_draws_what_the_reference_draws() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(&dir.join("arcana-cli-tiny-v1"));
    let expected = expected_turn(dir, "v1-square-sampled");
    let params = GenerationParams {
        temperature: 0.7,
        top_p: Some(0.9),
        max_new_tokens: 24,
        seed: Some(1234),
        ..GenerationParams::default()
    };
    let (completion, _) = answer(&engine, &square_request(dir, params));
    assert_eq!(completion.output_ids, ids(&expected["output_ids"])[1..]);
    assert_eq!(completion.text, expected["text"].as_str().unwrap());
}

#[test]
fn an_eos_id_ends_the_answer_with_reason_eos() {
    let Some(dir) = cli_fixtures() else { return };
    // The random checkpoint rarely says EOS by itself: make its third greedy token the EOS id.
    let expected = ids(&expected_turn(dir, "v1-square-greedy")["output_ids"]);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("arcana-cli-tiny-v1");
    copy_dir(&dir.join("arcana-cli-tiny-v1"), &model);
    let config = serde_json::json!({"bos_token_id": 1, "eos_token_id": [2, expected[3]], "pad_token_id": 0});
    std::fs::write(model.join("generation_config.json"), config.to_string()).unwrap();
    let engine = load(&model);
    let (completion, _) = answer(&engine, &square_request(dir, greedy(24)));
    assert_eq!(completion.finish.reason, FinishReason::Eos);
    assert_eq!(completion.output_ids, expected[1..4]);
}

#[test]
fn a_stop_string_ends_the_answer_and_is_trimmed() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(&dir.join("arcana-cli-tiny-v1"));
    let full = expected_turn(dir, "v1-square-greedy")["text"].as_str().unwrap().to_string();
    // A stop string that spans tokens in the middle of the answer.
    let stop = "organic navig";
    let at = full.find(stop).expect("the reference's text holds the stop string");
    let params = GenerationParams { stop: vec![stop.into(), "never appears".into()], ..greedy(24) };
    let (completion, _) = answer(&engine, &square_request(dir, params));
    assert_eq!(completion.finish.reason, FinishReason::Stop);
    assert_eq!(completion.text, full[..at]);
    assert!(completion.output_ids.len() < 24);
}

#[test]
fn returning_stop_from_the_callback_cancels_before_the_next_token() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(&dir.join("arcana-cli-tiny-v1"));
    let mut tokens = 0;
    let mut events = Vec::new();
    let completion = engine
        .generate(&square_request(dir, greedy(24)), |event| {
            let is_token = matches!(event, Event::Token(_));
            events.push(event);
            tokens += usize::from(is_token);
            if tokens == 3 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
    check_events(&events, &completion);
    assert_eq!(completion.finish.reason, FinishReason::Cancelled);
    assert_eq!(completion.output_ids.len(), 3);
}

#[test]
fn a_prompt_past_the_context_is_refused_with_its_length() {
    let Some(dir) = cli_fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("arcana-short-context-v1");
    copy_with_context(&dir.join("arcana-cli-tiny-v1"), &model, 64);
    let engine = load(&model);
    let err = engine.generate(&square_request(dir, greedy(24)), |_| Flow::Continue).expect_err("too long");
    assert!(matches!(err, Error::ContextFull { positions: 126, context: 64 }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("126 positions") && message.contains("context of 64"), "{message}");
    // The positions come from the ids before any image is decoded: bytes that are no image at all are
    // never read when the prompt cannot fit (a decode would have failed with an image error).
    let not_images = |count: usize| {
        (0..count).map(|i| ImageInput::Encoded { name: format!("image {i}"), bytes: b"no image".to_vec() }).collect()
    };
    let many = Request {
        input: RequestInput::Conversation(vec![ChatMessage::user_with_images(QUESTION, 10)]),
        images: not_images(10),
        params: greedy(24),
    };
    let per_image = engine.model().vision.tower.tokens_per_image();
    let started = std::time::Instant::now();
    match engine.generate(&many, |_| Flow::Continue).expect_err("too long") {
        Error::ContextFull { positions, context: 64 } => assert!(positions > 10 * per_image, "{positions}"),
        other => panic!("expected a full context, got {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    // Images and placeholders are counted before decoding too.
    let one_placeholder_two_images = Request {
        input: RequestInput::Prompt("USER: <image>\nhi ASSISTANT:".into()),
        images: not_images(2),
        params: greedy(4),
    };
    let err = engine.generate(&one_placeholder_two_images, |_| Flow::Continue).expect_err("two images, one place");
    let message = err.to_string();
    assert!(
        matches!(err, Error::InvalidInput(_)) && message.contains("1 image placeholder(s) but 2 image(s)"),
        "{message}"
    );
}

#[test]
fn bad_requests_are_errors() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(&dir.join("arcana-cli-tiny-v1"));
    let ends_with_reply = Request {
        input: RequestInput::Conversation(vec![ChatMessage::user("hi"), ChatMessage::assistant("hello")]),
        images: Vec::new(),
        params: greedy(4),
    };
    assert!(matches!(engine.generate(&ends_with_reply, |_| Flow::Continue), Err(Error::Prompt(_))));
    let image_without_pixels = Request {
        input: RequestInput::Prompt("USER: <image>\nhi ASSISTANT:".into()),
        images: Vec::new(),
        params: greedy(4),
    };
    assert!(matches!(engine.generate(&image_without_pixels, |_| Flow::Continue), Err(Error::InvalidInput(_))));
    let hot = GenerationParams { temperature: -1.0, ..greedy(4) };
    assert!(hot.check().is_err());
    assert!(engine.generate(&square_request(dir, hot), |_| Flow::Continue).is_err());
}

#[test]
fn a_handle_serves_two_threads_and_cancels() {
    let Some(dir) = cli_fixtures() else { return };
    let engine = load(&dir.join("arcana-cli-tiny-v1"));
    let expected = ids(&expected_turn(dir, "v1-square-greedy")["output_ids"])[1..].to_vec();
    let (handle, thread) = engine.spawn().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let handle = handle.clone();
            let dir = dir.to_path_buf();
            std::thread::spawn(move || handle.complete(square_request(&dir, greedy(24))).unwrap())
        })
        .collect();
    for worker in workers {
        let completion = worker.join().unwrap();
        assert_eq!(completion.output_ids, expected);
        assert_eq!(completion.finish.reason, FinishReason::Length);
    }

    // Cancelled after the first token: the engine stops at its next check, long before 24 tokens.
    let mut stream = handle.submit(square_request(dir, greedy(24))).unwrap();
    let cancel = stream.cancel_token();
    let mut tokens = 0;
    let mut finish = None;
    for event in stream.by_ref() {
        match event.unwrap() {
            Event::Token(_) => {
                tokens += 1;
                cancel.cancel();
            }
            Event::Finished(f) => finish = Some(f),
            _ => {}
        }
    }
    let finish = finish.expect("a cancelled answer still finishes");
    assert_eq!(finish.reason, FinishReason::Cancelled);
    assert!(tokens < 24, "{tokens} tokens after cancelling at the first");

    // An error travels back on the stream.
    let bad_temperature = Request {
        input: RequestInput::Prompt("hi".into()),
        images: Vec::new(),
        params: GenerationParams { temperature: f64::NAN, ..greedy(4) },
    };
    assert!(handle.submit(bad_temperature).unwrap().completion().is_err());

    drop(handle);
    thread.join().unwrap();
}

/// Answers `request` alone on the engine itself (no handle): the reference for the batched answers.
fn solo_ids(engine: &Engine, request: &Request) -> Vec<i64> {
    answer(engine, request).0.output_ids
}

#[test]
fn a_batched_handle_answers_alone_bit_for_bit_and_together_as_alone() {
    let Some(dir) = cli_fixtures() else { return };
    let model = dir.join("arcana-cli-tiny-v1");
    let image = |name: &str| vec![ImageInput::File(dir.join("images").join(name))];
    let ask = |text: &str, images: Vec<ImageInput>, max_new_tokens: usize| Request {
        input: RequestInput::Conversation(vec![ChatMessage::user_with_images(text, images.len())]),
        images,
        params: greedy(max_new_tokens),
    };
    // Prompts of different lengths, with and without an image, ending at different steps: rows join a
    // running batch, are left-padded, and leave it while others go on.
    let request = |i: usize| match i {
        0 => ask(QUESTION, image("square.png"), 24),
        1 => ask("Describe the picture in one long sentence, please.", image("wide.png"), 9),
        2 => ask("Hello there", Vec::new(), 17),
        _ => ask(QUESTION, image("wide.png"), 3),
    };
    let expected: Vec<Vec<i64>> = {
        let engine = load(&model);
        (0..4).map(|i| solo_ids(&engine, &request(i))).collect()
    };
    assert_eq!(expected[0], ids(&expected_turn(dir, "v1-square-greedy")["output_ids"])[1..].to_vec());

    let (handle, thread) = load(&model).spawn_batched(4).unwrap();
    // One at a time, every request is alone in the batch: the engine's own answer, bit for bit.
    for (i, expected) in expected.iter().enumerate() {
        assert_eq!(&handle.complete(request(i)).unwrap().output_ids, expected, "request {i} alone");
    }
    // All at once: they decode together. Measured on the cli-tiny checkpoint (cargo test --test engine,
    // both kernel paths of scripts/test.sh): every answer equals its solo answer.
    let streams: Vec<_> = (0..4).map(|i| handle.submit(request(i)).unwrap()).collect();
    for (i, (stream, expected)) in streams.into_iter().zip(&expected).enumerate() {
        let completion = stream.completion().unwrap();
        assert_eq!(&completion.output_ids, expected, "request {i} in the batch");
        let limit = request(i).params.max_new_tokens;
        let reason = if expected.len() == limit { FinishReason::Length } else { FinishReason::Eos };
        assert_eq!(completion.finish.reason, reason);
    }
    drop(handle);
    thread.join().unwrap();
}

/// Every token's id and log-probability bits, then the top 5's.
fn logprob_bits(completion: &Completion) -> Vec<Vec<(i64, u32)>> {
    let bits = |t: &arcana::engine::TokenLogprob| (t.id, t.logprob.to_bits());
    completion
        .logprobs
        .iter()
        .map(|l| std::iter::once(bits(&l.chosen)).chain(l.top.iter().map(bits)).collect())
        .collect()
}

#[test]
fn reused_images_and_prompt_beginnings_give_the_answers_computed_from_scratch() {
    let Some(dir) = cli_fixtures() else { return };
    let model = dir.join("arcana-cli-tiny-v1");
    let image = |name: &str| vec![ImageInput::File(dir.join("images").join(name))];
    let params = GenerationParams { logprobs: Some(5), ..greedy(12) };
    let ask = |messages: Vec<ChatMessage>, images: Vec<ImageInput>| Request {
        input: RequestInput::Conversation(messages),
        images,
        params: params.clone(),
    };
    let user = |text: &str, images: usize| ChatMessage::user_with_images(text, images);
    let first_turn = vec![user(QUESTION, 1)];
    let second_turn = vec![
        user(QUESTION, 1),
        ChatMessage { role: arcana::engine::Role::Assistant, text: "A square.".into(), images: 0 },
        user("And its colour?", 0),
    ];
    // The same image with new questions, a repeated prompt, a conversation that goes on, a different
    // image with the same placeholder, and text alone.
    let requests = [
        ask(first_turn.clone(), image("square.png")),
        ask(vec![user("Describe the picture in one long sentence, please.", 1)], image("square.png")),
        ask(first_turn.clone(), image("square.png")),
        ask(second_turn, image("square.png")),
        ask(first_turn, image("wide.png")),
        ask(vec![user("Hello there", 0)], Vec::new()),
        ask(vec![user("Hello there, how are you?", 0)], Vec::new()),
    ];
    let int8 = Some(arcana::quant::Quantization::Int8);
    for (quantization, prefill_chunk) in [(None, Some(8)), (int8, Some(8)), (None, None), (int8, None)] {
        let options = EngineOptions { quantization, prefill_chunk, ..EngineOptions::default() };
        let fresh = Engine::load(&model, options.clone()).unwrap();
        let reusing = Engine::load(&model, EngineOptions { reuse_budget_bytes: 1 << 30, ..options }).unwrap();
        let case = format!("{quantization:?}, chunk {prefill_chunk:?}");
        for (i, request) in requests.iter().enumerate() {
            let want = answer(&fresh, request).0;
            let got = answer(&reusing, request).0;
            // Measured on the cli-tiny checkpoint (cargo test --test engine reused, both kernel paths of
            // scripts/test.sh): without chunks the reused answers' log-probabilities differ from the
            // fresh ones in the low bits (another GEMM row count), and the ids are equal.
            assert_eq!(got.output_ids, want.output_ids, "{case}: request {i}");
            if prefill_chunk.is_some() {
                assert_eq!(logprob_bits(&got), logprob_bits(&want), "{case}: request {i}'s log-probabilities");
            }
        }
        let stats = reusing.reuse_stats().snapshot();
        // Images: square is encoded once and reused three times, wide once.
        assert_eq!((stats.image_hits, stats.image_misses), (3, 2), "{case}: {stats:?}");
        // Every prompt after the first starts like an earlier one (at least the template's system text).
        assert_eq!((stats.prefix_hits, stats.prefix_misses), (6, 1), "{case}: {stats:?}");
        assert!(stats.bytes > 0 && stats.bytes <= stats.budget, "{case}: {stats:?}");
    }
}

/// One user message with `picture` (an image of the fixtures), or text alone.
fn user_request(dir: &Path, text: &str, picture: Option<&str>, params: GenerationParams) -> Request {
    let images: Vec<ImageInput> = picture.map(|p| ImageInput::File(dir.join("images").join(p))).into_iter().collect();
    Request {
        input: RequestInput::Conversation(vec![ChatMessage::user_with_images(text, images.len())]),
        images,
        params,
    }
}

#[test]
fn int8_answers_in_a_batch_equal_their_solo_answers_while_others_join_in_chunks() {
    let Some(dir) = cli_fixtures() else { return };
    let model = dir.join("arcana-cli-tiny-v1");
    // Eight prompts of different lengths, with and without images, ending at different steps.
    let specs = [
        (QUESTION, Some("square.png"), 20),
        ("Describe the picture in one long sentence, please.", Some("wide.png"), 9),
        ("Hello there", None, 17),
        (QUESTION, Some("wide.png"), 3),
        ("Count to ten, slowly and with words.", None, 14),
        ("What colours do you see?", Some("square.png"), 11),
        ("Hi", None, 6),
        ("Tell me a story about a square that wanted to be round.", Some("wide.png"), 16),
    ];
    let request = |i: usize| {
        let (text, picture, max_new_tokens) = specs[i];
        user_request(dir, text, picture, GenerationParams { logprobs: Some(3), ..greedy(max_new_tokens) })
    };
    let options = EngineOptions {
        quantization: Some(arcana::quant::Quantization::Int8),
        merge_lora: true,
        prefill_chunk: Some(8),
        ..EngineOptions::default()
    };
    let solo: Vec<Completion> = {
        let engine = Engine::load(&model, options.clone()).unwrap();
        (0..specs.len()).map(|i| answer(&engine, &request(i)).0).collect()
    };
    let (handle, thread) = Engine::load(&model, options).unwrap().spawn_batched(8).unwrap();
    let streams: Vec<_> = (0..specs.len()).map(|i| handle.submit(request(i)).unwrap()).collect();
    for (i, (stream, want)) in streams.into_iter().zip(&solo).enumerate() {
        let got = stream.completion().unwrap();
        // Every int8 row is quantized on its own grid (integer products are exact), and the merged
        // decoder has no float projection left: each answer's log-probabilities equal its solo ones.
        assert_eq!(got.output_ids, want.output_ids, "request {i}");
        assert_eq!(logprob_bits(&got), logprob_bits(want), "request {i}'s log-probabilities");
    }
    drop(handle);
    thread.join().unwrap();
}

#[test]
fn a_request_cancelled_mid_prefill_leaves_the_batch_and_the_reuse_cache_consistent() {
    let Some(dir) = cli_fixtures() else { return };
    let model = dir.join("arcana-cli-tiny-v1");
    // One position per chunk: the prefill takes one chunk per turn of the loop, long enough to cancel.
    let options = EngineOptions { prefill_chunk: Some(1), reuse_budget_bytes: 1 << 30, ..EngineOptions::default() };
    let long = || user_request(dir, QUESTION, Some("square.png"), greedy(12));
    let short = || user_request(dir, "Hello there", None, greedy(10));
    let (solo_long, solo_short) = {
        let engine = Engine::load(&model, options.clone()).unwrap();
        (answer(&engine, &long()).0.output_ids, answer(&engine, &short()).0.output_ids)
    };
    let (handle, thread) = Engine::load(&model, options).unwrap().spawn_batched(4).unwrap();
    let running = handle.submit(short()).unwrap();
    let mut cancelled = handle.submit(long()).unwrap();
    let cancel = cancelled.cancel_token();
    let (mut tokens, mut finish) = (0, None);
    for event in cancelled.by_ref() {
        match event.unwrap() {
            Event::Started(_) => cancel.cancel(),
            Event::Token(_) => tokens += 1,
            Event::Finished(f) => finish = Some(f),
            _ => {}
        }
    }
    assert_eq!(finish.expect("a cancelled answer still finishes").reason, FinishReason::Cancelled);
    assert_eq!(tokens, 0, "cancelled before its prefill ended");
    assert_eq!(running.completion().unwrap().output_ids, solo_short);
    // Kept: the running answer's prompt and the image's features; nothing of the cancelled prompt.
    assert_eq!(handle.reuse_stats().entries, 2, "{:?}", handle.reuse_stats());
    // The same request again, now to its end: its solo answer.
    assert_eq!(handle.complete(long()).unwrap().output_ids, solo_long);
    drop(handle);
    thread.join().unwrap();
}
