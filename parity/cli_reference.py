#!/usr/bin/env python3
"""The release's command-line chat (`arcana/serve/cli.py`), run on the project's PyTorch reference.

    source scripts/env.sh
    python parity/cli_reference.py --model-path DIR --image-file IMG --prompt "What is this?" \\
        [--prompt "and then?" ...] --temperature T [--top-p P] [--top-k K] [--seed S] \\
        --max-new-tokens N [--conv-mode M] [--out FILE]

The flow follows the release's CLI, step by step, with the project's own modules (parity/arcana_ref/,
parity/arcana_ref_conversation.py) instead of the release's code:
- the model folder with `parity/arcana_ref.load_arcana` (fp32 on CPU; the release runs fp16 on a GPU), the
  tokenizer with `AutoTokenizer.from_pretrained(model_path, use_fast=False)` (the slow LlamaTokenizer);
- the conversation template from the folder's name (`get_model_name_from_path`, then "llama-2", "mistral",
  "v1.6-34b", "v1", "mpt", else `llava_v0`), unless `--conv-mode` names one;
- `Image.open(f).convert("RGB")`, then `process_images` with the config's `image_aspect_ratio` (`pad`:
  expand to a square filled with `int(255 * mean)`) and the vision folder's `CLIPImageProcessor`;
- each `--prompt` is one user turn: the first gets `<image>\\n` in front; the prompt is the template with
  the whole history and an empty assistant slot; `tokenizer_image_token` puts -200 where `<image>` was;
- `generate(input_ids, images=..., do_sample=temperature > 0, temperature=T, max_new_tokens=N,
  streamer=TextStreamer(skip_prompt=True, skip_special_tokens=True), use_cache=True)`; top-p / top-k come
  from the folder's generation_config.json (transformers' default top_k 50) unless --top-p / --top-k are
  given (the release has no such options); the image goes with every turn, as in the release;
- `torch.manual_seed(seed)` once, right before the first generate, when --seed is given (the release
  never seeds);
- the reply kept in the history is `tokenizer.decode(output_ids[0]).strip()` (with `<s>`, and `</s>` when
  generation met EOS), as the release stores it;
- generation stops at EOS or after N new tokens: the release's CLI builds its stop keyword (`</s>` for v1)
  but never passes a stopping criterion to generate.

Visual mask: the release's MM-LoRA marks positions [35, 675) as visual in every multi-token forward and
raises for a forward of 2..674 positions. With the tiny checkpoints a CLI prompt is far shorter, so this
runs the project's sliced policy (`mask[:, 35:675] = True` cut at the sequence length); `mask_policy` in the
output says which applied.

Output (stdout, or --out): one JSON object; see parity/README.md, section "CLI reference".
"""
import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import arcana_ref_conversation as conv  # noqa: E402
from preprocess_fixtures import expand_to_square  # noqa: E402

VISUAL_START, VISUAL_END = 35, 35 + 576 + 64


def load_image(path):
    """The release's `load_image` for a local file (no EXIF rotation)."""
    return Image.open(path).convert("RGB")


def process_images(images, processor, image_aspect_ratio):
    """`mm_utils.process_images` for the `pad` and plain settings."""
    if image_aspect_ratio == "pad":
        fill = tuple(int(x * 255) for x in processor.image_mean)
        out = [processor.preprocess(expand_to_square(im, fill), return_tensors="pt")["pixel_values"][0]
               for im in images]
        return torch.stack(out, dim=0)
    if image_aspect_ratio == "anyres":
        raise NotImplementedError("image_aspect_ratio anyres is not reproduced")
    return processor(images, return_tensors="pt")["pixel_values"]


def tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(conv.DEFAULT_IMAGE_TOKEN)]
    return conv.splice_image_tokens(chunks, tokenizer.bos_token_id)


def mask_policy(prefill_len):
    if prefill_len == 1 or prefill_len >= VISUAL_END:
        return "release"
    return "sliced"


class Loaded:
    """A model folder loaded once: model, tokenizer, image processor, config."""

    def __init__(self, model_path):
        from transformers import AutoTokenizer, CLIPImageProcessor
        from arcana_ref.llava import load_arcana, vision_tower_dir

        with open(os.path.join(model_path, "config.json")) as f:
            self.config = json.load(f)
        self.model = load_arcana(model_path, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
        if self.config.get("mm_use_im_patch_token", True) or self.config.get("mm_use_im_start_end", False):
            raise NotImplementedError("mm_use_im_patch_token / mm_use_im_start_end add tokens; not reproduced")
        if len(self.tokenizer) != self.config["vocab_size"]:
            # the release resizes the embeddings to len(tokenizer); a tiny checkpoint must already match
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens, the model {self.config['vocab_size']}")
        self.processor = CLIPImageProcessor.from_pretrained(vision_tower_dir(model_path, self.config))


class _Collect:
    """transformers' TextStreamer, keeping what it would print instead of printing it."""

    def __init__(self, tokenizer):
        from transformers import TextStreamer

        pieces = self.pieces = []

        class Streamer(TextStreamer):
            def on_finalized_text(self, text, stream_end=False):
                pieces.append(text)

        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def text(self):
        return "".join(self.pieces)


def run_cli(model_path, image_file, prompts, temperature, max_new_tokens, top_p=None, top_k=None, seed=None,
            conv_mode=None, loaded=None):
    import transformers

    if not prompts:
        raise ValueError("at least one --prompt is needed")
    if any(not p for p in prompts):
        raise ValueError("an empty prompt ends the release's CLI; give non-empty prompts")
    loaded = loaded or Loaded(model_path)
    model, tokenizer = loaded.model, loaded.tokenizer

    model_name = conv.model_name_from_path(model_path)
    inferred = conv.template_for_model_name(model_name)
    mode = conv_mode or inferred
    template = conv.TEMPLATES[mode]

    image = load_image(image_file)
    image_size = list(image.size)
    pixel_values = process_images([image], loaded.processor, loaded.config.get("image_aspect_ratio"))
    visual_tokens = None

    gen = model.generation_config
    do_sample = temperature > 0
    extra = {}
    if top_p is not None:
        extra["top_p"] = top_p
    if top_k is not None:
        extra["top_k"] = top_k

    messages = []
    turns = []
    first = True
    seeded = False
    for text in prompts:
        inp = conv.cli_user_message(text, first, loaded.config.get("mm_use_im_start_end", False))
        first = False
        messages.append(conv.Message(template.roles[0], inp))
        prompt = conv.render_prompt(template, messages + [conv.Message(template.roles[1], None)])
        input_ids = tokenizer_image_token(prompt, tokenizer)
        ids = torch.tensor([input_ids], dtype=torch.long)
        n_images = input_ids.count(conv.IMAGE_TOKEN_INDEX)
        if visual_tokens is None:
            with torch.no_grad():
                visual_tokens = model.encode_images(pixel_values).shape[1]
        prefill_len = len(input_ids) + n_images * (visual_tokens - 1)

        collect = _Collect(tokenizer)
        if seed is not None and not seeded:
            torch.manual_seed(seed)
            seeded = True
        with torch.inference_mode():
            # return_dict_in_generate / output_scores only package the result (the scores give the greedy
            # margins below); the computation is the release's call
            generated = model.generate(ids, images=pixel_values, image_sizes=[tuple(image_size)],
                                       do_sample=do_sample, temperature=temperature,
                                       max_new_tokens=max_new_tokens, streamer=collect.streamer,
                                       use_cache=True, return_dict_in_generate=True, output_scores=True,
                                       **extra)
        output_ids = generated.sequences
        margin = None
        if not do_sample:
            # smallest gap between the best and the second-best logit over the greedy steps: how far the
            # run is from a tie that a rounding difference could flip
            top2 = torch.stack([s[0].topk(2).values for s in generated.scores])
            margin = float((top2[:, 0] - top2[:, 1]).min())
        reply = tokenizer.decode(output_ids[0]).strip()
        messages.append(conv.Message(template.roles[1], reply))
        out = output_ids[0].tolist()
        greedy_logprobs = None
        if not do_sample:
            # the log-probabilities the engine reports: log_softmax of each step's logits (greedy scores are
            # the logits), at the chosen token and the five most likely, in float32
            greedy_logprobs = []
            for scores, token in zip(generated.scores, out[1:]):
                logprobs = torch.log_softmax(scores[0].float(), -1)
                top = logprobs.topk(5)
                greedy_logprobs.append({"id": token, "logprob": float(logprobs[token]),
                                        "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)]})
        turns.append({
            "prompt": prompt,
            "input_ids": input_ids,
            "prefill_len": prefill_len,
            "mask_policy": mask_policy(prefill_len),
            "output_ids": out,
            "new_tokens": len(out) - 1,
            "stopped_at_eos": out[-1] == tokenizer.eos_token_id,
            "greedy_min_margin": margin,
            "greedy_logprobs": greedy_logprobs,
            "text": collect.text(),
            "text_decoded": tokenizer.decode(output_ids[0], skip_special_tokens=True),
            "reply": reply,
        })

    policies = {t["mask_policy"] for t in turns}
    pv = pixel_values.contiguous().numpy().astype("<f4").tobytes()
    return {
        "implementation": "parity/cli_reference.py on parity/arcana_ref (fp32, CPU)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_path": model_path,
        "model_name": model_name,
        "conv_mode": mode,
        "conv_mode_inferred": inferred,
        "stop_string": template.stop_string(),
        "stopping": "eos or max_new_tokens (the release's CLI does not pass its stop string to generate)",
        "image_file": image_file,
        "image_size": image_size,
        "pixel_values": {"shape": list(pixel_values.shape), "sha256_f32le": hashlib.sha256(pv).hexdigest()},
        "visual_tokens_per_image": visual_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_p": top_p if top_p is not None else gen.top_p,
        "top_k": top_k if top_k is not None else gen.top_k,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "mask_policy": ("sliced: positions [35, 675) cut at the sequence length are visual (the release raises "
                        "for multi-token forwards of 2..674 positions)") if "sliced" in policies
        else "release",
        "turns": turns,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--image-file", required=True)
    p.add_argument("--prompt", action="append", required=True, help="one user turn; repeat for more turns")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--conv-mode", default=None, choices=sorted(conv.TEMPLATES))
    p.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    result = run_cli(args.model_path, args.image_file, args.prompt, args.temperature, args.max_new_tokens,
                     top_p=args.top_p, top_k=args.top_k, seed=args.seed, conv_mode=args.conv_mode)
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
