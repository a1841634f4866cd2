#!/usr/bin/env python3
"""Records what the slow transformers 4.37.2 `LlamaTokenizer` (sentencepiece 0.1.99) gives for fuzzed
strings, so that tests/tokenizer.rs can compare the Rust tokenizer with it.

    source scripts/env.sh && python parity/tokenizer_fixtures.py            # writes the fixtures
    source scripts/env.sh && python parity/tokenizer_fixtures.py --check    # regenerates, compares

Inputs: ../shared/tokenizers/{llama2,mistral-7b-v0.1}-tokenizer.model (or $ARCANA_SHARED/tokenizers).
Outputs, in tests/fixtures/tokenizer/:
  strings.jsonl          one JSON string per line: the fuzzed texts (seeded, see SEED)
  <model>.jsonl          per text, same line order: {"L": ids legacy=True, "N": ids legacy=False,
                         "dL"/"dN": decode(ids, skip_special_tokens=True), "sL"/"sN": decode(ids)}
                         ("N" is left out when equal to "L", "dL"/"dN" when equal to the text;
                         "sL"/"sN" are recorded for the first KEEP_SPECIAL_CASES texts only)
  <model>-decode.jsonl   random id sequences (byte pieces, specials, anything) and their decodes
                         {"ids", "dL", "dN", "sL", "sN"}
  <model>-options.jsonl  the first OPTION_CASES texts with add_bos_token=False, add_eos_token=True
                         {"L", "N"}
"""
import argparse
import filecmp
import json
import os
import random
import sys
import tempfile
from pathlib import Path

SEED = 20240611
NUM_STRINGS = 5000
KEEP_SPECIAL_CASES = 1000  # texts whose decode(ids) with special tokens is recorded
NUM_DECODE_CASES = 600
OPTION_CASES = 300
MODELS = {
    "llama2": "llama2-tokenizer.model",
    "mistral": "mistral-7b-v0.1-tokenizer.model",
}
REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "fixtures" / "tokenizer"

WORDS = [
    "hello", "world", "the", "image", "What", "is", "in", "this", "picture", "?", "cat", "dog",
    "USER:", "ASSISTANT:", "Describe", "detail", "a", "an", "of", "and", "car", "tokenizer",
    "don't", "I'm", "naïve", "café", "Zürich", "東京", "北京大学", "こんにちは", "안녕하세요",
    "привет", "مرحبا", "नमस्ते", "γειά", "שלום", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "∑", "π", "→",
    "3.14", "2024", "1,000,000", "0x1F", "#", "$", "%", "&", "*", "(", ")", "[", "]", "{", "}",
    "e-mail", "http://example.com/a?b=c", "C++", "x86_64", "GPT-4", "<image>", "<s>", "</s>",
    "<unk>", "<pad>", "<s", "s>", "</", "▁", "▁▁", "\u200b", "\ufeff", "\u00a0", "\u3000",
]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t", "    ", "\u3000", "\xa0"]
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def random_char(rng):
    kind = rng.random()
    if kind < 0.35:
        return chr(rng.randint(0x20, 0x7E))
    if kind < 0.45:
        return chr(rng.randint(0x4E00, 0x9FFF))  # CJK
    if kind < 0.55:
        return chr(rng.randint(0x1F300, 0x1FAFF))  # emoji
    if kind < 0.62:
        return chr(rng.randint(0xC0, 0x24F))  # accented Latin
    if kind < 0.67:
        return chr(rng.randint(0x400, 0x4FF))  # Cyrillic
    if kind < 0.70:
        return chr(rng.randint(0x300, 0x36F))  # combining marks
    if kind < 0.74:
        return rng.choice(["\t", "\n", "\r", "\x0b", "\x0c", "\x00", "\x1f", "\x7f", "\x85"])
    if kind < 0.80:
        return rng.choice("0123456789")
    # Anything outside the surrogates (which cannot be UTF-8).
    while True:
        cp = rng.randint(0x80, 0x10FFFF)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def random_text(rng):
    parts = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(WORDS))
        elif r < 0.6:
            parts.append(rng.choice(WHITESPACE))
        elif r < 0.75:
            parts.append("".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 12))))
        else:
            parts.append("".join(random_char(rng) for _ in range(rng.randint(1, 8))))
        if rng.random() < 0.5:
            parts.append(" ")
    return "".join(parts)


def chat_prompt(rng):
    turns = []
    for _ in range(rng.randint(1, 3)):
        question = random_text(rng) if rng.random() < 0.5 else rng.choice(WORDS) + " " + rng.choice(WORDS)
        answer = random_text(rng)
        turns.append((question, answer))
    first_image = "<image>\n" if rng.random() < 0.7 else ""
    text = SYSTEM + " " if rng.random() < 0.3 else ""
    for i, (q, a) in enumerate(turns):
        text += "USER: " + (first_image if i == 0 else "") + q + " ASSISTANT:"
        if i + 1 < len(turns) or rng.random() < 0.5:
            text += " " + a + "</s>"
    return text


def fixed_strings():
    return [
        "", " ", "  ", "\n", "\t", "▁", "hello", " hello", "  hello", "hello ", "Hello world",
        "ok</s>USER: next", "USER: hi ASSISTANT: ok</s>USER: next", "<s>", "</s>", "<unk>",
        "<s> hi", " <s> hi", "hi <s>", "a<s>b</s>c<unk>d", "<s><s></s>", "<image>",
        "USER: <image>\nWhat is this? ASSISTANT:", "1234567890", "3.14159", "😀😀😀", "東京タワー",
        "\u200b", "\x00", "▁▁x", "x▁y", " ▁ ", "<0x41>", "\ufffd", "a\u0300", "🇫🇷🇩🇪",
        SYSTEM + " USER: <image>\nDescribe the image. ASSISTANT:",
        # Runs of one character: equal-score merges at several places, so the leftmost-first rule shows.
        "aaaaa", "!!!!!", "hhhhhhh", "______", "=====", "..........", "xxxxxxxxxxxxxxxxxxxx", "zzz zzz",
        "</s>!!!!!", "<s>hhhhhhh", "   ", "\n\n\n\n", "ééééé", "🙂🙂🙂🙂",
    ]


def make_strings():
    rng = random.Random(SEED)
    strings = fixed_strings()
    while len(strings) < NUM_STRINGS:
        strings.append(chat_prompt(rng) if rng.random() < 0.2 else random_text(rng))
    return strings


def make_id_sequences(rng, vocab_size):
    seqs = []
    for _ in range(NUM_DECODE_CASES):
        seq = []
        for _ in range(rng.randint(0, 20)):
            r = rng.random()
            if r < 0.3:
                seq.append(rng.randint(3, 258))  # byte pieces
            elif r < 0.4:
                seq.append(rng.randint(0, 2))  # specials
            elif r < 0.5:
                seq.append(rng.choice([259, 268, 29871, 29889, 13]))  # spaces, newline
            else:
                seq.append(rng.randint(0, vocab_size - 1))
        seqs.append(seq)
    return seqs


def dump(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def model_path(filename):
    shared = os.environ.get("ARCANA_SHARED") or str(REPO.parent / "shared")
    path = Path(shared) / "tokenizers" / filename
    # scripts/setup-python.sh caches the Mistral model from the mistral-common wheel on every machine.
    cached = Path.home() / ".cache" / "arcana" / "tokenizers" / filename
    return path if path.is_file() or not cached.is_file() else cached


def write_fixtures(out_dir, models):
    from transformers import LlamaTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # legacy=True is chosen on purpose
    out_dir.mkdir(parents=True, exist_ok=True)
    strings = make_strings()
    with open(out_dir / "strings.jsonl", "w", encoding="utf-8") as f:
        for s in strings:
            f.write(dump(s) + "\n")

    for name, filename in models.items():
        path = str(model_path(filename))
        toks = {"L": LlamaTokenizer(path, legacy=True), "N": LlamaTokenizer(path, legacy=False)}
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, s in enumerate(strings):
                rec = {}
                for key, tok in toks.items():
                    ids = tok.encode(s)
                    if key == "L" or ids != rec["L"]:
                        rec[key] = ids
                    text = tok.decode(ids, skip_special_tokens=True)
                    if text != s:
                        rec["d" + key] = text
                    if i < KEEP_SPECIAL_CASES:
                        rec["s" + key] = tok.decode(ids, skip_special_tokens=False)
                f.write(dump(rec) + "\n")

        rng = random.Random(f"{SEED}-{name}")
        vocab_size = toks["L"].vocab_size
        with open(out_dir / f"{name}-decode.jsonl", "w", encoding="utf-8") as f:
            for ids in make_id_sequences(rng, vocab_size):
                rec = {"ids": ids}
                for key, tok in toks.items():
                    rec["d" + key] = tok.decode(ids, skip_special_tokens=True)
                    rec["s" + key] = tok.decode(ids, skip_special_tokens=False)
                f.write(dump(rec) + "\n")

        opts = {
            key: LlamaTokenizer(path, legacy=(key == "L"), add_bos_token=False, add_eos_token=True)
            for key in ("L", "N")
        }
        with open(out_dir / f"{name}-options.jsonl", "w", encoding="utf-8") as f:
            for s in strings[:OPTION_CASES]:
                f.write(dump({key: tok.encode(s) for key, tok in opts.items()}) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    args = parser.parse_args()
    models = {name: f for name, f in MODELS.items() if model_path(f).is_file()}
    missing = sorted(set(MODELS.values()) - set(models.values()))
    if not args.check:
        if missing:
            sys.exit(f"missing tokenizer models: {missing} (set ARCANA_SHARED)")
        write_fixtures(OUT_DIR, models)
        return
    if missing:
        print(f"skipping the fixtures of {missing}: not on this machine (set ARCANA_SHARED)")
    with tempfile.TemporaryDirectory() as tmp:
        write_fixtures(Path(tmp), models)
        names = sorted(p.name for p in Path(tmp).iterdir())
        # Committed files of the models present (named `<model>.jsonl`, `<model>-*.jsonl`) and the strings.
        def checked(name):
            return name == "strings.jsonl" or name.split("-")[0].split(".")[0] in models
        committed = sorted(p.name for p in OUT_DIR.iterdir() if checked(p.name)) if OUT_DIR.is_dir() else []
        _, mismatch, errors = filecmp.cmpfiles(tmp, OUT_DIR, names, shallow=False)
        if mismatch or errors or names != committed:
            sys.exit(f"tokenizer fixtures differ from {OUT_DIR}: changed {mismatch}, missing {errors}, "
                     f"committed {committed} vs generated {names}")
    print("tokenizer fixtures match")


if __name__ == "__main__":
    main()
