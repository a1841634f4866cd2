#!/usr/bin/env python3
"""The PyTorch side of the benchmark (parity/bench/bench.py runs it as a child process): one answer by the
release's CLI flow, fp32 on CPU, timed. Writes one JSON object (--out).

    python parity/bench/pytorch_side.py --model-path DIR --image-file IMG --prompt Q --max-new-tokens 32 \\
        --threads N --out FILE [--arcana-src SRC]

With --arcana-src, the release's own modules do the work, loaded as its model builder does
(`LlavaLlamaForCausalLM.from_pretrained`, the slow tokenizer, `resize_token_embeddings`, the vision tower's
image processor), but in fp32: the builder's fp16 cannot run on CPU with torch 2.0.1. `low_cpu_mem_usage`
(the builder's setting) needs accelerate; without it transformers loads the default way, and the output
says which. Without --arcana-src, the project's reference modules (parity/arcana_ref) follow the same flow
(as parity/cli_reference.py does). Then, as the release's serve/cli.py: load_image, process_images,
the template with `<image>\\n` before the question, tokenizer_image_token, and
`generate(..., do_sample=False, temperature=0, max_new_tokens=N, streamer=TextStreamer, use_cache=True)`.

Timings (perf_counter): load (model, tokenizer, image processor; imports excluded), image preprocess
(load_image + process_images), prefill (template + tokenizing + generate up to the first new token: vision,
splice and prefill), decode (first new token to the last). The streamer is transformers' TextStreamer
with printing left out; its put() marks when each token arrives.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.path.dirname(HERE)


def fail(message):
    sys.stderr.write(f"pytorch_side: {message}\n")
    sys.exit(2)


class Side:
    """The release's modules or the project's reference, behind the same calls."""

    def __init__(self, arcana_src):
        self.arcana_src = arcana_src
        self.low_cpu_mem_usage = None

    def load(self, model_path, conv_mode):
        import torch
        from transformers import AutoTokenizer

        if self.arcana_src:
            sys.path.insert(0, os.path.abspath(self.arcana_src))
            try:
                from arcana.constants import IMAGE_TOKEN_INDEX
                from arcana.conversation import conv_templates
                from arcana.mm_utils import process_images, tokenizer_image_token
                from arcana.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
            except ImportError as e:
                fail(f"cannot import the release's modules from {self.arcana_src}: {e}")
            from transformers.utils import is_accelerate_available
            t0 = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
            cfg = LlavaConfig.from_pretrained(model_path)
            if not os.path.isabs(cfg.mm_vision_tower):
                # the release resolves the tower folder against the working directory
                cfg.mm_vision_tower = os.path.join(os.path.abspath(model_path), cfg.mm_vision_tower)
            kwargs = {"torch_dtype": torch.float32}
            self.low_cpu_mem_usage = is_accelerate_available()
            if self.low_cpu_mem_usage:
                kwargs.update(low_cpu_mem_usage=True, device_map={"": "cpu"})
            model = LlavaLlamaForCausalLM.from_pretrained(model_path, config=cfg, **kwargs)
            if getattr(model.config, "mm_use_im_patch_token", True) or getattr(model.config, "mm_use_im_start_end",
                                                                                False):
                fail("the benchmark checkpoint must not add image patch / start / end tokens")
            model.resize_token_embeddings(len(tokenizer))
            vision_tower = model.get_vision_tower()
            if not vision_tower.is_loaded:
                vision_tower.load_model()
            processor = vision_tower.image_processor
            load_seconds = time.perf_counter() - t0

            def render(question):
                conv = conv_templates[conv_mode].copy()
                conv.append_message(conv.roles[0], "<image>\n" + question)
                conv.append_message(conv.roles[1], None)
                return conv.get_prompt()

            self.process = lambda image: process_images([image], processor, model.config)
            self.ids = lambda prompt: tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX,
                                                            return_tensors="pt").unsqueeze(0)
            self.render = render
            self.implementation = f"release modules from {os.path.abspath(self.arcana_src)} (fp32, CPU)"
        else:
            sys.path.insert(0, PARITY)
            import arcana_ref_conversation as conv
            from cli_reference import Loaded, process_images, tokenizer_image_token

            t0 = time.perf_counter()
            loaded = Loaded(model_path)
            load_seconds = time.perf_counter() - t0
            model, tokenizer = loaded.model, loaded.tokenizer
            template = conv.TEMPLATES[conv_mode]

            def render(question):
                user = conv.Message(template.roles[0], conv.cli_user_message(question, True, False))
                return conv.render_prompt(template, [user, conv.Message(template.roles[1], None)])

            self.process = lambda image: process_images([image], loaded.processor,
                                                        loaded.config.get("image_aspect_ratio"))
            self.ids = lambda prompt: torch.tensor([tokenizer_image_token(prompt, tokenizer)], dtype=torch.long)
            self.render = render
            self.implementation = "parity/arcana_ref (fp32, CPU)"
        self.model, self.tokenizer = model, tokenizer
        return load_seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--image-file", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--conv-mode", default="llava_v1")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--arcana-src", default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    for path, what in ((args.model_path, "--model-path"), (args.image_file, "--image-file")):
        if not os.path.exists(path):
            fail(f"{what} {path} does not exist")
    if args.arcana_src and not os.path.isdir(os.path.join(args.arcana_src, "arcana")):
        fail(f"--arcana-src {args.arcana_src} has no arcana/ package")

    import torch
    import transformers
    from PIL import Image
    from transformers import TextStreamer

    torch.set_num_threads(args.threads)
    side = Side(args.arcana_src)
    load_seconds = side.load(args.model_path, args.conv_mode)
    model, tokenizer = side.model, side.tokenizer
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.device != "cpu" or dtype != torch.float32:
        # as the release's builder: the whole model, vision tower included, on the device in the dtype
        t0 = time.perf_counter()
        model.to(device=args.device, dtype=dtype)
        model.get_vision_tower().to(device=args.device, dtype=dtype)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        load_seconds += time.perf_counter() - t0
        side.implementation = side.implementation.replace("fp32, CPU", f"{args.dtype}, {args.device}")

    arrivals = []

    class TimedStreamer(TextStreamer):
        def put(self, value):
            arrivals.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text, stream_end=False):
            pass  # the release prints; the benchmark keeps stdout for nothing

    prefill_lengths = []
    # the decoder's first call is the prefill: its inputs_embeds length counts the image's positions
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: prefill_lengths.append(kw["inputs_embeds"].shape[1])
        if not prefill_lengths and kw.get("inputs_embeds") is not None else None, with_kwargs=True)

    t0 = time.perf_counter()
    image = Image.open(args.image_file).convert("RGB")
    pixel_values = side.process(image).to(device=args.device, dtype=dtype)
    preprocess_seconds = time.perf_counter() - t0

    t_request = time.perf_counter()
    prompt = side.render(args.prompt)
    input_ids = side.ids(prompt).to(args.device)
    with torch.inference_mode():
        output = model.generate(input_ids, images=pixel_values, image_sizes=[image.size], do_sample=False,
                                temperature=0.0, max_new_tokens=args.max_new_tokens,
                                streamer=TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                                use_cache=True)
    t_end = time.perf_counter()
    hook.remove()
    # put() #0 is the prompt, then one per new token
    token_times = arrivals[1:]
    if not token_times:
        fail("generate produced no token")
    result = {
        "implementation": side.implementation,
        "low_cpu_mem_usage": side.low_cpu_mem_usage,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "image_preprocess_seconds": preprocess_seconds,
        "prefill_seconds": token_times[0] - t_request,
        "decode_seconds": token_times[-1] - token_times[0],
        "generate_end_seconds": t_end - t_request,
        "prefill_positions": prefill_lengths[0] if prefill_lengths else None,
        "input_ids_len": int(input_ids.shape[1]),
        "output_ids": output[0].tolist(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
