#!/usr/bin/env python3
"""Reference runs of the release's CLI flow (parity/cli_reference.py) for tests of the `arcana` binary.

    source scripts/env.sh
    python parity/cli_fixtures.py --out DIR [--tokenizer-model PATH] [--no-llama2]
    python parity/cli_fixtures.py --check DIR      # regenerate into a temp dir, compare every file
    python parity/cli_fixtures.py --release-check DIR --arcana-src SRC   # replay with the release's modules

Writes, in DIR:
  arcana-cli-tiny-v1/          the `cli-tiny` checkpoint (parity/export.py, seed 0) with the Mistral 7B v0.1
                               tokenizer.model (vocabulary 32000; scripts/setup-python.sh fetches it)
  arcana-cli-tiny-llama2-v1/   the same weights with the Llama 2 / Vicuna v1.5 tokenizer.model, only where
                               ../shared/tokenizers/llama2-tokenizer.model exists (never required)
  images/square.png            64x64 RGB, deterministic pattern
  images/wide.png              97x61 RGB (non-square: padded to 97x97, odd margin)
  expected/<case>.json         cli_reference.py's output for the case, paths relative to DIR
  cases.json                   [{"name", "args": the `arcana` arguments (paths relative to DIR, without
                               --json), "expected": "expected/<case>.json", "tokenizer"}]

PNG only: the Rust JPEG decoder differs from Pillow's libjpeg-turbo by a few levels (parity/README.md).
"""
import argparse
import filecmp
import json
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import export  # noqa: E402
import cli_reference  # noqa: E402

SEED = 0
MODEL = "arcana-cli-tiny-v1"            # "v1" in the name: the release picks llava_v1
MODEL_LLAMA2 = "arcana-cli-tiny-llama2-v1"
QUESTION = "What is in this image?"
GREEDY = ["--temperature", "0", "--max-new-tokens", "24"]
SAMPLED = ["--seed", "1234", "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "24"]

# name -> (model folder, image, prompts, options)
CASES = {
    "v1-square-greedy": (MODEL, "square", [QUESTION], GREEDY),
    "v1-wide-greedy": (MODEL, "wide", ["Describe the picture in detail."], GREEDY),
    "v1-square-sampled": (MODEL, "square", [QUESTION], SAMPLED),
    # top-p 0.6 and top-k 50 from generation_config.json / transformers' defaults
    "v1-wide-sampled-config": (MODEL, "wide", [QUESTION],
                               ["--seed", "7", "--temperature", "0.9", "--max-new-tokens", "24"]),
    "v0-wide-greedy": (MODEL, "wide", [QUESTION], ["--conv-mode", "llava_v0"] + GREEDY),
    "v0-square-sampled": (MODEL, "square", ["What colors do you see?"], ["--conv-mode", "llava_v0"] + SAMPLED),
    # seeded once before the first turn; history kept; the image only in the first user message
    "v1-square-3turns-sampled": (MODEL, "square", [QUESTION, "Why?", "Tell me more about the colors."],
                                 ["--seed", "1234", "--temperature", "0.7", "--top-p", "0.9",
                                  "--max-new-tokens", "16"]),
    "v1-wide-3turns-greedy": (MODEL, "wide", [QUESTION, "Are you sure?", "Thanks!"],
                              ["--temperature", "0", "--max-new-tokens", "12"]),
}
LLAMA2_CASES = {
    "llama2-v1-square-greedy": (MODEL_LLAMA2, "square", [QUESTION], GREEDY),
    "llama2-v1-wide-sampled": (MODEL_LLAMA2, "wide", [QUESTION], SAMPLED),
}


def make_images(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20240611)
    y, x = np.mgrid[0:64, 0:64]
    square = np.stack([(x * 4) % 256, (y * 4) % 256, ((x + y) * 2) % 256], -1)
    square = np.clip(square + rng.integers(-20, 21, square.shape), 0, 255).astype(np.uint8)
    Image.fromarray(square, "RGB").save(os.path.join(out_dir, "square.png"))
    y, x = np.mgrid[0:61, 0:97]
    wide = np.stack([255 - (x * 2) % 256, (y * 5 + 40) % 256, ((x * y) // 7) % 256], -1)
    wide[20:40, 30:60] = (200, 30, 30)  # a red block
    wide = np.clip(wide + rng.integers(-10, 11, wide.shape), 0, 255).astype(np.uint8)
    Image.fromarray(wide, "RGB").save(os.path.join(out_dir, "wide.png"))


def parse_options(options):
    p = argparse.ArgumentParser()
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--conv-mode")
    return p.parse_args(options)


def write_fixtures(out, tokenizer_model=None, llama2=True, log=print):
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    make_images(os.path.join(out, "images"))
    export.make_checkpoint("cli-tiny", SEED, os.path.join(out, MODEL), tokenizer_model=tokenizer_model)
    cases = dict(CASES)
    tokenizers = {MODEL: os.path.basename(tokenizer_model) if tokenizer_model
                  else "mistral-7b-v0.1-tokenizer.model"}
    llama2_model = export.llama2_tokenizer_model() if llama2 else None
    if llama2_model:
        export.make_checkpoint("cli-tiny", SEED, os.path.join(out, MODEL_LLAMA2), tokenizer_model=llama2_model)
        cases.update(LLAMA2_CASES)
        tokenizers[MODEL_LLAMA2] = "llama2-tokenizer.model"
    log(f"checkpoints and images: {time.time() - t0:.1f} s")

    os.makedirs(os.path.join(out, "expected"), exist_ok=True)
    loaded = {}
    index = []
    for name, (model, image, prompts, options) in cases.items():
        t = time.time()
        if model not in loaded:
            loaded[model] = cli_reference.Loaded(os.path.join(out, model))
        o = parse_options(options)
        image_rel = f"images/{image}.png"
        result = cli_reference.run_cli(
            os.path.join(out, model), os.path.join(out, image_rel), prompts, o.temperature, o.max_new_tokens,
            top_p=o.top_p, top_k=o.top_k, seed=o.seed, conv_mode=o.conv_mode, loaded=loaded[model])
        result["model_path"] = model
        result["image_file"] = image_rel
        args = ["--model-path", model, "--image-file", image_rel]
        for p in prompts:
            args += ["--prompt", p]
        args += options
        result["args"] = args
        expected = f"expected/{name}.json"
        with open(os.path.join(out, expected), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
            f.write("\n")
        index.append({"name": name, "args": args, "expected": expected, "tokenizer": tokenizers[model]})
        first = result["turns"][0]
        log(f"{name}: {len(result['turns'])} turn(s), first turn {first['new_tokens']} new tokens"
            f"{' (EOS)' if first['stopped_at_eos'] else ''}, {time.time() - t:.1f} s")
    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"total: {time.time() - t0:.1f} s")


def compare_dirs(a, b):
    problems = []
    fa = {os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs}
    fb = {os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs}
    for f in sorted(fa ^ fb):
        problems.append(f"{f}: only in {'the checked folder' if f in fa else 'the fresh run'}")
    for f in sorted(fa & fb):
        if not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False):
            problems.append(f"{f}: contents differ")
    return problems


def release_check(fx, arcana_src, log=print):
    """Replays every case of a fixture folder with the release's own `conversation.py`, `mm_utils.py` and
    model (a checkout of syp2ysy/Arcana; fp32 CPU, its SLoRA given the sliced visual mask as in
    `export.py reference --release-sliced-mask`), following serve/cli.py; compares prompt, input ids, output
    ids and the stored reply of every turn. Returns the number of mismatching turns."""
    import torch
    from transformers import AutoTokenizer
    sys.path.insert(0, os.path.abspath(arcana_src))
    from arcana.constants import IMAGE_TOKEN_INDEX
    from arcana.conversation import conv_templates
    from arcana.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token

    models, bad = {}, 0
    for case in json.load(open(os.path.join(fx, "cases.json"))):
        exp = json.load(open(os.path.join(fx, case["expected"]), encoding="utf-8"))
        o = parse_options(_options_only(exp["args"]))
        path = os.path.join(fx, exp["model_path"])
        if path not in models:
            models[path] = (export.ReleaseModel(path, arcana_src, sliced_mask=True).model,
                            AutoTokenizer.from_pretrained(path, use_fast=False))
        model, tok = models[path]
        name = get_model_name_from_path(path).lower()
        mode = o.conv_mode or next((m for k, m in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                                                   ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"),
                                                   ("mpt", "mpt")) if k in name), "llava_v0")
        conv = conv_templates[mode].copy()
        image = Image.open(os.path.join(fx, exp["image_file"])).convert("RGB")
        pixel_values = process_images([image], model.get_vision_tower().image_processor, model.config)
        extra = {k: v for k, v in (("top_p", o.top_p), ("top_k", o.top_k)) if v is not None}
        prompts = [exp["args"][i + 1] for i, x in enumerate(exp["args"]) if x == "--prompt"]
        for k, inp in enumerate(prompts):
            conv.append_message(conv.roles[0], ("<image>\n" + inp) if k == 0 else inp)
            conv.append_message(conv.roles[1], None)
            prompt = conv.get_prompt()
            ids = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
            if k == 0 and o.seed is not None:
                torch.manual_seed(o.seed)
            with torch.inference_mode():
                out = model.generate(ids, images=pixel_values, image_sizes=[image.size],
                                     do_sample=o.temperature > 0, temperature=o.temperature,
                                     max_new_tokens=o.max_new_tokens, use_cache=True, **extra)
            reply = tok.decode(out[0]).strip()
            conv.messages[-1][-1] = reply
            turn = exp["turns"][k]
            same = {"prompt": prompt == turn["prompt"], "input_ids": ids[0].tolist() == turn["input_ids"],
                    "output_ids": out[0].tolist() == turn["output_ids"], "reply": reply == turn["reply"]}
            bad += not all(same.values())
            log(f"{case['name']} turn {k + 1}: " + ("identical" if all(same.values())
                                                    else "differs in " + ", ".join(x for x, v in same.items() if not v)))
    return bad


def _options_only(args):
    """The generation options of a case's `arcana` arguments (drops paths and prompts)."""
    out, i = [], 0
    while i < len(args):
        if args[i] in ("--model-path", "--image-file", "--prompt"):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="folder to write (created; existing files are overwritten)")
    g.add_argument("--check", metavar="DIR", help="regenerate into a temp dir and compare with DIR")
    g.add_argument("--release-check", metavar="DIR",
                   help="replay DIR's cases with the release's own modules (needs --arcana-src)")
    p.add_argument("--arcana-src", default=None, help="a checkout of syp2ysy/Arcana (for --release-check)")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model for arcana-cli-tiny-v1 (default: the cached Mistral 7B v0.1 one)")
    p.add_argument("--no-llama2", action="store_true",
                   help="skip the Llama 2 tokenizer variant even where ../shared/tokenizers has it")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*`do_sample` is set to `False`.*")
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if args.release_check:
        if not args.arcana_src:
            p.error("--release-check needs --arcana-src")
        warnings.filterwarnings("ignore")
        bad = release_check(args.release_check, args.arcana_src, log)
        print("every turn identical to the release's modules" if not bad else f"{bad} turns differ")
        return 1 if bad else 0
    if args.out:
        write_fixtures(args.out, args.tokenizer_model, not args.no_llama2, log)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_fixtures(tmp, args.tokenizer_model, not args.no_llama2, log)
        problems = compare_dirs(args.check, tmp)
    for x in problems:
        print("  " + x)
    print("CLI fixtures match a fresh run" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
