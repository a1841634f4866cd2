"""Writes tests/fixtures/conversation/*.json from our Python port of the release's templates.

    python parity/conversation_fixtures.py                 # regenerate the fixtures
    python parity/conversation_fixtures.py --check         # CI: regenerate in memory, fail on any difference
    python parity/conversation_fixtures.py --against-release /tmp/arcana-src
        # compare our port with the release's own conversation.py / mm_utils.py (a folder holding `arcana/`)

prompts.json needs nothing beyond Python. image_token_ids.json records, per prompt, the ids the slow
LlamaTokenizer gives each `<image>`-separated chunk; regenerating those needs transformers, sentencepiece and
the SentencePiece model (--tokenizer-model). Without them, --check re-splices the recorded chunk ids only.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arcana_ref_conversation as ref  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "conversation"
DEFAULT_TOKENIZER = Path("/work/shared/tokenizers/llama2-tokenizer.model")

QUESTIONS = ["What is shown in this image?", "Why is it unusual?", "Describe the colours, briefly."]
REPLIES = ["A man ironing clothes on the back of a taxi.", "Ironing is usually done indoors."]
IMAGE_MODES = ["none", "cli", "cli_im_start_end", "web_tuple"]


def _turns(template: ref.Template, questions, replies, image_mode: str, reply_to_last=None):
    """Messages the way the release's front ends build them: replies for earlier turns, an open last slot."""
    user, assistant = template.roles
    messages = []
    for k, question in enumerate(questions):
        first = k == 0 and image_mode != "none"
        if first and image_mode == "web_tuple":
            # gradio_web_server.add_text appends the marker when the user did not write one
            messages.append(ref.Message(user, question + "\n<image>", image=True))
        else:
            text = ref.cli_user_message(question, first, image_mode == "cli_im_start_end")
            messages.append(ref.Message(user, text))
        last = k == len(questions) - 1
        messages.append(ref.Message(assistant, reply_to_last if last else replies[k]))
    return messages


def _edge_cases(template: ref.Template):
    user, assistant = template.roles
    return {
        "empty_first_question": [ref.Message(user, ""), ref.Message(assistant, None)],
        "empty_reply_mid_conversation": [ref.Message(user, "Hi"), ref.Message(assistant, ""),
                                         ref.Message(user, "Still there?"), ref.Message(assistant, None)],
        "closed_conversation": [ref.Message(user, "Hi"), ref.Message(assistant, "Hello.")],
        "web_tuple_marker_inside_and_odd_spaces": [
            ref.Message(user, "\x1c \u3000Look <image> here\t\n\x1f", image=True), ref.Message(assistant, None)],
        "web_tuple_only_marker": [ref.Message(user, "<image>", image=True), ref.Message(assistant, None)],
        "web_tuple_in_later_turn": [ref.Message(user, "Hi"), ref.Message(assistant, "Hello."),
                                    ref.Message(user, "And this?\n<image>", image=True),
                                    ref.Message(assistant, None)],
        "two_images_unicode": [ref.Message(user, "<image>\n<image>\nCompare: café ≠ 咖啡 🙂"),
                               ref.Message(assistant, None)],
        "assistant_speaks_first": [ref.Message(assistant, "Welcome."), ref.Message(user, "Thanks"),
                                   ref.Message(assistant, None)],
        "reply_with_release_cli_decoding": [  # serve/cli.py stores tokenizer.decode(ids) with <s> and </s>
            ref.Message(user, "<image>\nWhat is it?"), ref.Message(assistant, "<s> A cat.</s>"),
            ref.Message(user, "Colour?"), ref.Message(assistant, None)],
    }


def _outcome(template: ref.Template, messages):
    try:
        return {"prompt": ref.render_prompt(template, messages)}
    except ref.PromptError as e:
        return {"error": e.release_exception}


def _message_json(m: ref.Message):
    return {"role": m.role, "text": m.text, "image": m.image}


def prompt_cases():
    for name, template in ref.TEMPLATES.items():
        for turns in (1, 2, 3):
            for image_mode in IMAGE_MODES:
                messages = _turns(template, QUESTIONS[:turns], REPLIES, image_mode)
                yield f"{name}/{turns}_turns/{image_mode}", name, messages
        for edge, messages in _edge_cases(template).items():
            yield f"{name}/{edge}", name, messages


def build_prompts():
    templates = {
        name: {"system": t.system, "roles": list(t.roles), "sep_style": t.style, "sep": t.sep,
               "sep2": t.sep2, "version": t.version, "preset_messages": [_message_json(m) for m in t.preset],
               "stop_string": t.stop_string()}
        for name, t in ref.TEMPLATES.items()}
    cases = []
    for case_id, name, messages in prompt_cases():
        case = {"id": case_id, "template": name, "messages": [_message_json(m) for m in messages]}
        case.update(_outcome(ref.TEMPLATES[name], messages))
        cases.append(case)
    model_names = ["Arcana", "arcana-7b", "llava-v1.5-7b", "LLaVA-V1.5-13B", "llava-llama-2-13b-chat",
                   "llava-v1.6-mistral-7b", "llava-v1.6-34b", "LLaVA-v1.6-34B-mistral", "mpt-7b-chat",
                   "v1-mpt", "llama-2-mpt", "Arcana_star", "vicuna", ""]
    paths = ["syp115/Arcana_star", "/ckpt/Arcana/", "runs/arcana-v1/checkpoint-500", "checkpoint-9",
             "arcana", "/", "a//b"]
    path_cases = []
    for p in paths:
        try:
            path_cases.append({"path": p, "model_name": ref.model_name_from_path(p)})
        except ref.PromptError as e:
            path_cases.append({"path": p, "error": e.release_exception})
    return {
        "generated_by": "python parity/conversation_fixtures.py (from parity/arcana_ref_conversation.py)",
        "templates": templates,
        "cases": cases,
        "model_names": [{"model_name": n, "template": ref.template_for_model_name(n)} for n in model_names],
        "model_paths": path_cases,
    }


# ---- tokenizer_image_token -------------------------------------------------------------------------

SPLICE_PROMPTS = {
    "llava_v1_one_turn": "llava_v1/1_turns/cli",
    "llava_v1_two_turns": "llava_v1/2_turns/cli",
    "llava_v1_no_image": "llava_v1/1_turns/none",
    "llava_llama_2_image": "llava_llama_2/1_turns/cli",
    "plain_image_first": "plain/1_turns/cli",
    "two_images": "llava_v1/two_images_unicode",
    "start_end_markers": "llava_v0/1_turns/cli_im_start_end",
}
EXTRA_SPLICE_PROMPTS = {"only_marker": "<image>", "empty": "", "marker_at_end": "Look:<image>",
                        "adjacent_markers": "a<image><image>b"}


def _splice_prompts(prompts_fixture):
    by_id = {c["id"]: c for c in prompts_fixture["cases"]}
    out = {key: by_id[case_id]["prompt"] for key, case_id in SPLICE_PROMPTS.items()}
    out.update(EXTRA_SPLICE_PROMPTS)
    return out


def _slow_llama_tokenizer(model_path: Path):
    from transformers import LlamaTokenizer
    return LlamaTokenizer(vocab_file=str(model_path), legacy=True)


def build_image_token_ids(prompts_fixture, tokenizer_model: Path):
    tok = _slow_llama_tokenizer(tokenizer_model)
    cases = []
    for key, prompt in _splice_prompts(prompts_fixture).items():
        chunks = [tok(chunk).input_ids for chunk in prompt.split(ref.DEFAULT_IMAGE_TOKEN)]
        cases.append({"id": key, "prompt": prompt, "chunk_ids": chunks,
                      "input_ids": ref.splice_image_tokens(chunks, tok.bos_token_id)})
    return {
        "generated_by": "python parity/conversation_fixtures.py --tokenizer-model " + tokenizer_model.name,
        "tokenizer": {"class": "transformers 4.37.2 LlamaTokenizer (slow)", "legacy": True,
                      "model_file": tokenizer_model.name, "bos_id": tok.bos_token_id},
        "image_token_index": ref.IMAGE_TOKEN_INDEX,
        "cases": cases,
    }


def resplice_only(recorded):
    """The check CI can run without a tokenizer: recorded chunk ids -> our splice -> recorded ids."""
    bos = recorded["tokenizer"]["bos_id"]
    for case in recorded["cases"]:
        if ref.splice_image_tokens(case["chunk_ids"], bos) != case["input_ids"]:
            return [case["id"]]
    return []


# ---- against the release ---------------------------------------------------------------------------

def compare_with_release(release_root: Path, prompts_fixture, tokenizer_model: Path):
    sys.path.insert(0, str(release_root))
    from arcana import conversation as rel  # the release's own module
    differences = []
    for name, t in ref.TEMPLATES.items():
        r = rel.conv_templates[name]
        style = {rel.SeparatorStyle.SINGLE: ref.SINGLE, rel.SeparatorStyle.TWO: ref.TWO,
                 rel.SeparatorStyle.MPT: ref.MPT, rel.SeparatorStyle.PLAIN: ref.PLAIN,
                 rel.SeparatorStyle.LLAMA_2: ref.LLAMA_2}[r.sep_style]
        stop = r.sep if r.sep_style != rel.SeparatorStyle.TWO else r.sep2  # serve/cli.py
        theirs = (r.system, tuple(r.roles), style, r.sep, r.sep2, r.version, stop,
                  [tuple(m) for m in r.messages])
        ours = (t.system, t.roles, t.style, t.sep, t.sep2, t.version, t.stop_string(),
                [(m.role, m.text) for m in t.preset])
        if theirs != ours:
            differences.append(f"template {name}")
    if set(rel.conv_templates) != set(ref.TEMPLATES):
        differences.append("template names")
    for case in prompts_fixture["cases"]:
        conv = rel.conv_templates[case["template"]].copy()
        for m in case["messages"]:
            conv.append_message(m["role"], (m["text"], None, "Default") if m["image"] else m["text"])
        try:
            theirs = {"prompt": conv.get_prompt()}
        except Exception as e:  # noqa: BLE001 - the release's failures are part of what we match
            theirs = {"error": type(e).__name__}
        ours = {k: case[k] for k in ("prompt", "error") if k in case}
        if theirs != ours:
            differences.append(f"case {case['id']}: release {theirs!r} ours {ours!r}")
    from arcana import mm_utils  # imports torch and transformers
    for p in prompts_fixture["model_paths"]:
        try:
            theirs = {"model_name": mm_utils.get_model_name_from_path(p["path"])}
        except Exception as e:  # noqa: BLE001
            theirs = {"error": type(e).__name__}
        if theirs != {k: v for k, v in p.items() if k != "path"}:
            differences.append(f"model path {p['path']!r}: release {theirs}")
    n_splice = 0
    if tokenizer_model.exists():
        tok = _slow_llama_tokenizer(tokenizer_model)
        for key, prompt in _splice_prompts(prompts_fixture).items():
            chunks = [tok(c).input_ids for c in prompt.split(ref.DEFAULT_IMAGE_TOKEN)]
            if mm_utils.tokenizer_image_token(prompt, tok) != ref.splice_image_tokens(chunks, tok.bos_token_id):
                differences.append(f"tokenizer_image_token {key}")
            n_splice += 1
    print(f"compared {len(ref.TEMPLATES)} templates, {len(prompts_fixture['cases'])} prompt cases, "
          f"{len(prompts_fixture['model_paths'])} model paths, {n_splice} tokenizer_image_token prompts "
          f"with the release: {len(differences)} differences")
    for d in differences:
        print("  " + d)
    return not differences


# ---- main ------------------------------------------------------------------------------------------

def _dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def _can_tokenize(tokenizer_model: Path) -> bool:
    try:
        import sentencepiece  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return tokenizer_model.exists()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the fixtures differ from a regeneration")
    parser.add_argument("--against-release", type=Path, help="folder holding the release's arcana/ package")
    parser.add_argument("--tokenizer-model", type=Path,
                        default=Path(os.environ.get("ARCANA_LLAMA_TOKENIZER", DEFAULT_TOKENIZER)))
    args = parser.parse_args()

    prompts = build_prompts()
    if args.against_release:
        sys.exit(0 if compare_with_release(args.against_release, prompts, args.tokenizer_model) else 1)

    prompts_path, ids_path = FIXTURES / "prompts.json", FIXTURES / "image_token_ids.json"
    tokenize = _can_tokenize(args.tokenizer_model)
    if args.check:
        failures = []
        if not prompts_path.exists() or prompts_path.read_text(encoding="utf-8") != _dump(prompts):
            failures.append(str(prompts_path))
        recorded = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.exists() else None
        if recorded is None:
            failures.append(str(ids_path))
        elif tokenize:
            if _dump(build_image_token_ids(prompts, args.tokenizer_model)) != ids_path.read_text(encoding="utf-8"):
                failures.append(str(ids_path))
        else:
            print(f"no tokenizer ({args.tokenizer_model}): checking {ids_path.name} by re-splicing recorded chunks")
            failures += [f"{ids_path}: {c}" for c in resplice_only(recorded)]
        if failures:
            print("out of date (run python parity/conversation_fixtures.py):\n  " + "\n  ".join(failures))
            sys.exit(1)
        print("conversation fixtures up to date")
        return

    FIXTURES.mkdir(parents=True, exist_ok=True)
    prompts_path.write_text(_dump(prompts), encoding="utf-8")
    print(f"wrote {prompts_path} ({len(prompts['cases'])} cases)")
    if tokenize:
        ids_path.write_text(_dump(build_image_token_ids(prompts, args.tokenizer_model)), encoding="utf-8")
        print(f"wrote {ids_path}")
    else:
        print(f"skipped {ids_path.name}: needs transformers, sentencepiece and {args.tokenizer_model}")


if __name__ == "__main__":
    main()
