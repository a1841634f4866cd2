//! Conversation templates and `tokenizer_image_token` against fixtures recorded from our Python port
//! (parity/arcana_ref_conversation.py), which was compared with the release's own conversation.py and
//! mm_utils.py: `python parity/conversation_fixtures.py --against-release /tmp/arcana-src` (0 differences).
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use arcana::prompt::conversation::{
    cli_display_roles, cli_user_message, model_name_from_path, resolve_conv_mode, template_by_name,
    template_for_model_name, CliChat, Conversation, SeparatorStyle, TEMPLATE_NAMES,
};
use arcana::prompt::image_tokens::{
    image_token_positions, splice_image_chunks, tokenizer_image_token, TextEncoder, IMAGE_TOKEN_INDEX,
};
use arcana::{Error, Result};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conversation").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn opt_str(v: &Value) -> Option<&str> {
    v.as_str()
}

fn style_name(style: SeparatorStyle) -> &'static str {
    match style {
        SeparatorStyle::Single => "single",
        SeparatorStyle::Two => "two",
        SeparatorStyle::Mpt => "mpt",
        SeparatorStyle::Plain => "plain",
        SeparatorStyle::Llama2 => "llama_2",
    }
}

/// The fixture's conversation: the named template plus the case's messages.
fn conversation_for(case: &Value) -> Conversation {
    let mut conv = template_by_name(case["template"].as_str().unwrap()).unwrap();
    for m in case["messages"].as_array().unwrap() {
        let (role, text) = (m["role"].as_str().unwrap(), opt_str(&m["text"]));
        if m["image"].as_bool().unwrap() {
            conv.append_message_with_image(role, text.unwrap());
        } else {
            conv.append_message(role, text);
        }
    }
    conv
}

// Recorded by `python parity/conversation_fixtures.py` (tests/fixtures/conversation/prompts.json).
#[test]
fn templates_have_the_release_fields_and_stop_strings() {
    let fx = fixture("prompts.json");
    let templates = fx["templates"].as_object().unwrap();
    let names: BTreeSet<&str> = templates.keys().map(String::as_str).collect();
    assert_eq!(names, TEMPLATE_NAMES.iter().copied().collect());
    for (name, t) in templates {
        let conv = template_by_name(name).unwrap();
        assert_eq!(conv.system, t["system"].as_str().unwrap(), "{name}: system");
        assert_eq!(
            conv.roles.to_vec(),
            t["roles"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(style_name(conv.sep_style), t["sep_style"].as_str().unwrap(), "{name}");
        assert_eq!(conv.sep, t["sep"].as_str().unwrap(), "{name}");
        assert_eq!(conv.sep2.as_deref(), opt_str(&t["sep2"]), "{name}");
        assert_eq!(conv.version, t["version"].as_str().unwrap(), "{name}");
        assert_eq!(conv.stop_string(), opt_str(&t["stop_string"]), "{name}: stop string");
        let preset = t["preset_messages"].as_array().unwrap();
        assert_eq!(conv.messages.len(), preset.len(), "{name}");
        for (m, p) in conv.messages.iter().zip(preset) {
            assert_eq!((m.role.as_str(), m.text.as_deref()), (p["role"].as_str().unwrap(), opt_str(&p["text"])));
        }
    }
}

// Recorded by `python parity/conversation_fixtures.py`: every template x 1-3 turns x
// {no image, CLI "<image>\n", CLI "<im_start><image><im_end>\n", web-UI tuple} plus edge cases.
#[test]
fn prompts_equal_the_release_for_every_recorded_case() {
    let fx = fixture("prompts.json");
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 336);
    let mut failures = Vec::new();
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let got = conversation_for(case).get_prompt();
        match (opt_str(&case["prompt"]), &got) {
            (Some(want), Ok(got)) if want == got => {}
            // The release raises here (TypeError or AssertionError, recorded in "error").
            (None, Err(Error::Prompt(_))) => assert!(case["error"].is_string(), "{id}"),
            _ => failures.push(format!("{id}: want {:?} / {:?}, got {got:?}", case["prompt"], case["error"])),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

// The CLI flow must build the same prompts the fixture records for its "cli*" and "none" cases.
#[test]
fn cli_chat_reproduces_the_recorded_turns() {
    let fx = fixture("prompts.json");
    let by_id: HashMap<&str, &Value> =
        fx["cases"].as_array().unwrap().iter().map(|c| (c["id"].as_str().unwrap(), c)).collect();
    // Same texts as QUESTIONS / REPLIES in parity/conversation_fixtures.py.
    let questions = ["What is shown in this image?", "Why is it unusual?", "Describe the colours, briefly."];
    let replies = ["A man ironing clothes on the back of a taxi.", "Ironing is usually done indoors."];
    let mut checked = 0;
    for name in TEMPLATE_NAMES {
        for (mode, with_image, start_end) in
            [("none", false, false), ("cli", true, false), ("cli_im_start_end", true, true)]
        {
            let mut chat = CliChat::new(template_by_name(name).unwrap(), with_image, start_end);
            for turns in 1..=3 {
                let case = by_id[format!("{name}/{turns}_turns/{mode}").as_str()];
                let prompt = chat.prompt_for(questions[turns - 1]);
                match opt_str(&case["prompt"]) {
                    Some(want) => assert_eq!(prompt.unwrap(), want, "{name} {turns} {mode}"),
                    None => {
                        assert!(prompt.is_err(), "{name} {turns} {mode}: the release raises");
                        break;
                    }
                }
                checked += 1;
                if turns < 3 {
                    chat.record_reply(replies[turns - 1]).unwrap();
                }
            }
        }
    }
    assert_eq!(checked, 16 * 3 * 3 - 2 * 3 * 2);
}

#[test]
fn cli_chat_keeps_its_state_when_the_release_would_raise() {
    // plain has no sep2: a second turn with a recorded reply is a TypeError in the release.
    let mut chat = CliChat::new(template_by_name("plain").unwrap(), true, false);
    assert_eq!(chat.prompt_for("Hi").unwrap(), "<image>\nHi\n");
    chat.record_reply("Hello").unwrap();
    let before = chat.conversation().clone();
    assert!(matches!(chat.prompt_for("Again"), Err(Error::Prompt(_))));
    assert_eq!(chat.conversation(), &before);
    assert!(chat.record_reply("twice").is_err(), "no open slot after a recorded reply");
    assert!(chat.prompt_for("").is_err(), "the CLI ends on empty input");
}

#[test]
fn cli_chat_puts_the_image_in_the_first_turn_only() {
    let mut chat = CliChat::for_model("checkpoints/llava-v1.5-7b", None, true, false).unwrap();
    assert_eq!(chat.stop_string(), Some("</s>"));
    let first = chat.prompt_for("one").unwrap();
    chat.record_reply("r").unwrap();
    let second = chat.prompt_for("two").unwrap();
    assert!(first.ends_with(" USER: <image>\none ASSISTANT:"), "{first}");
    assert!(second.ends_with("<image>\none ASSISTANT: r</s>USER: two ASSISTANT:"), "{second}");
    assert_eq!(second.matches("<image>").count(), 1);
    assert!(CliChat::for_model("x", Some("no_such_template"), false, false).is_err());
}

// Recorded by `python parity/conversation_fixtures.py` (model_names / model_paths of prompts.json).
#[test]
fn model_name_and_template_choice_follow_the_release() {
    let fx = fixture("prompts.json");
    for c in fx["model_names"].as_array().unwrap() {
        let name = c["model_name"].as_str().unwrap();
        assert_eq!(template_for_model_name(name), c["template"].as_str().unwrap(), "{name}");
    }
    for c in fx["model_paths"].as_array().unwrap() {
        let path = c["path"].as_str().unwrap();
        match opt_str(&c["model_name"]) {
            Some(want) => assert_eq!(model_name_from_path(path).unwrap(), want, "{path}"),
            None => assert!(model_name_from_path(path).is_err(), "{path}: the release raises"),
        }
    }
}

#[test]
fn conv_mode_flag_overrides_with_the_release_warning() {
    let inferred = resolve_conv_mode("llava-v1.5-7b", None);
    assert_eq!((inferred.inferred, inferred.chosen.as_str(), inferred.warning()), ("llava_v1", "llava_v1", None));
    assert_eq!(resolve_conv_mode("llava-v1.5-7b", Some("llava_v1")).warning(), None);
    let overridden = resolve_conv_mode("Arcana", Some("llava_v1"));
    assert_eq!(overridden.chosen, "llava_v1");
    assert_eq!(
        overridden.warning().unwrap(),
        "[WARNING] the auto inferred conversation mode is llava_v0, while `--conv-mode` is llava_v1, using llava_v1"
    );
    let mpt = template_by_name("mpt").unwrap();
    assert_eq!(cli_display_roles("mpt-7b", &mpt), ["user".to_string(), "assistant".to_string()]);
    assert_eq!(cli_display_roles("llava-v1.5", &mpt), mpt.roles);
    assert_eq!(cli_user_message("q", true, true), "<im_start><image><im_end>\nq");
}

#[test]
fn set_last_message_text_needs_a_message() {
    let mut conv = template_by_name("llava_v1").unwrap();
    assert!(conv.set_last_message_text("x").is_err());
    assert!(template_by_name("LLAVA_V1").is_err(), "names are exact, as in the release's dict");
}

// ---- tokenizer_image_token ----

/// Replays the ids the slow LlamaTokenizer gave each chunk, recorded by
/// `python parity/conversation_fixtures.py` (tests/fixtures/conversation/image_token_ids.json).
struct RecordedEncoder {
    chunks: HashMap<String, Vec<i64>>,
    bos: i64,
}

impl TextEncoder for RecordedEncoder {
    fn encode_with_bos(&self, text: &str) -> Result<Vec<i64>> {
        self.chunks.get(text).cloned().ok_or_else(|| Error::Tokenizer(format!("no recording for {text:?}")))
    }
    fn bos_id(&self) -> i64 {
        self.bos
    }
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn tokenizer_image_token_equals_the_release_on_recorded_llama_ids() {
    let fx = fixture("image_token_ids.json");
    assert_eq!(fx["image_token_index"].as_i64(), Some(IMAGE_TOKEN_INDEX));
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let chunk_ids: Vec<Vec<i64>> = case["chunk_ids"].as_array().unwrap().iter().map(ids).collect();
        let encoder = RecordedEncoder {
            chunks: prompt.split("<image>").map(str::to_owned).zip(chunk_ids).collect(),
            bos: fx["tokenizer"]["bos_id"].as_i64().unwrap(),
        };
        let got = tokenizer_image_token(prompt, &encoder).unwrap();
        assert_eq!(got, ids(&case["input_ids"]), "{}", case["id"]);
        assert_eq!(image_token_positions(&got).len(), prompt.matches("<image>").count());
    }
}

/// One id per byte, BOS first when `bos` is set: enough to see where chunks are cut.
struct ByteEncoder {
    bos: Option<i64>,
}

impl TextEncoder for ByteEncoder {
    fn encode_with_bos(&self, text: &str) -> Result<Vec<i64>> {
        if text.contains('!') {
            return Err(Error::Tokenizer("cannot encode '!'".into()));
        }
        Ok(self.bos.into_iter().chain(text.bytes().map(i64::from)).collect())
    }
    fn bos_id(&self) -> i64 {
        self.bos.unwrap_or(1)
    }
}

#[test]
fn tokenizer_image_token_keeps_one_bos_and_one_index_per_image() {
    let with_bos = ByteEncoder { bos: Some(1) };
    assert_eq!(tokenizer_image_token("ab<image>c", &with_bos).unwrap(), vec![1, 97, 98, -200, 99]);
    assert_eq!(tokenizer_image_token("<image><image>", &with_bos).unwrap(), vec![1, -200, -200]);
    assert_eq!(tokenizer_image_token("abc", &with_bos).unwrap(), vec![1, 97, 98, 99]);
    assert_eq!(image_token_positions(&[1, -200, 5, -200]), vec![1, 3]);
    // Without a leading BOS nothing is cut, as in the release.
    let without_bos = ByteEncoder { bos: None };
    assert_eq!(tokenizer_image_token("ab<image>c", &without_bos).unwrap(), vec![97, 98, -200, 99]);
    // The release cuts the first id of later chunks even when it is not BOS.
    assert_eq!(splice_image_chunks(&[vec![1, 5], vec![7, 8]], 1, -200), vec![1, 5, -200, 8]);
    assert_eq!(splice_image_chunks(&[], 1, -200), Vec::<i64>::new());
    assert!(matches!(tokenizer_image_token("a<image>b!", &with_bos), Err(Error::Tokenizer(_))));
}
