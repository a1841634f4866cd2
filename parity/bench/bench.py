#!/usr/bin/env python3
"""Side-by-side speed and memory benchmark: the PyTorch path and the Rust `arcana` CLI, in one run, on
one machine, on one random checkpoint in the release's layout. Prints a markdown table of ratios against
PyTorch and writes every number as JSON. Run it through `bash scripts/bench.sh` (builds the binary).

    python parity/bench/bench.py [--small] [--arcana-src DIR] [--threads N] [--repeat K] [--out FILE]

Checkpoint (made once, cached under ~/.cache/arcana/bench/<name from the sizes>): by default the full-size
vision side (CLIP ViT-L/14-336 with 24 ladder layers, select layer -2, mlp2x_gelu projector) and 4 decoder
layers at Vicuna-7B width (hidden 4096, MLP 11008, 32 heads, vocabulary 32000, MM-LoRA ranks 64 / 192),
fp32 on disk (about 7.1 GB), with the Mistral 7B v0.1 SentencePiece tokenizer that
scripts/setup-python.sh fetches. `--small` makes tiny widths with the same 336-pixel image, so the
workload keeps its ~700 and ~1500 positions and runs end to end in about a minute.

Workload: the image, template llava_v1, greedy, 32 new tokens; the release's waterview question (~700
positions: the image is 576 + 64 of them) and the same question followed by ~800 tokens of text (~1500).
Each (mode, prompt) is its own process; both sides get the same prompt and thread count. Modes:
PyTorch fp32; arcana exact (fp32); int8 (--load-8bit --merge-lora); fp16 (--dtype fp16 --merge-lora);
int4 (--load-4bit --merge-lora). A mode whose process fails is a row that says so.

`--peer llama.cpp` adds llama.cpp on the same decoder as GGUF (parity/bench/llamacpp_peer.py), each
format beside the arcana mode of the same bits, and a second table of the pairs.
"""
import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.path.dirname(HERE)
REPO = os.path.dirname(PARITY)
sys.path.insert(0, PARITY)
sys.path.insert(0, HERE)
import llamacpp_peer  # noqa: E402

QUESTION = "What are the things I should be cautious about when I visit here?"  # the release's example
CONV_MODE = "llava_v1"
LADDER_QUERIES = 64
INT4_GROUP = 64  # src/llm/int4.rs
CHECKPOINT_LAYOUT = 1  # bump when the generated checkpoint changes, so cached ones are not reused

FULL = dict(vision_hidden=1024, vision_mlp=4096, vision_layers=24, vision_heads=16, image_size=336,
            llm_hidden=4096, llm_mlp=11008, llm_layers=4, llm_heads=32)
SMALL = dict(vision_hidden=64, vision_mlp=128, vision_layers=2, vision_heads=2, image_size=336,
             llm_hidden=64, llm_mlp=96, llm_layers=2, llm_heads=4)
VOCAB = 32000  # the tokenizer's

# What each mode keeps in memory and reads per decoded token (the roofline's bytes):
# `base`: bytes per weight of the decoder projections; `lora`: whether both MM-LoRA branches run at each
# decode step (unmerged: the release runs the empty visual branch times 0 too); `dense`: bytes per value
# of lm_head, the embedding row and the norms; `kv`: bytes per KV-cache value. fp16 assumes the cache
# and lm_head in fp16 too (`--dtype fp16` sets the model's dtype).
# base: the decoder projections' form; head: lm_head's form (the fast modes store it compactly too, int4
# mode as int8); lora: the MM-LoRA branches are read at language positions (unmerged); kv: bytes per
# KV-cache value (the fast modes keep the cache in fp16 on the CPU); norms and embedding rows stay fp32
# in every CPU mode.
MODES = {
    "pytorch": dict(label="PyTorch fp32", side="pytorch", base="fp32", head="fp32", lora=True),
    "exact": dict(label="arcana exact (fp32)", side="rust", flags=[], base="fp32", head="fp32", lora=True),
    "int8": dict(label="arcana int8", side="rust", flags=["--load-8bit", "--merge-lora"], base="int8",
                 head="int8", lora=False, kv=2),
    "fp16": dict(label="arcana fp16 weights", side="rust", flags=["--dtype", "fp16", "--merge-lora"],
                 base="fp16", head="fp16", lora=False, kv=2),
    "int4": dict(label="arcana int4", side="rust", flags=["--load-4bit", "--merge-lora"], base="int4",
                 head="int8", lora=False, kv=2),
}
# The same modes read from pre-quantized folders (`arcana-convert --quantize MODE --merge-lora`, made once
# beside the checkpoint): no weight flags, the folder's manifest names its mode. Their ids must equal the
# mode's quantized at load.
for _mode in ("int8", "fp16", "int4"):
    MODES[f"{_mode}-folder"] = dict(MODES[_mode], label=f"{MODES[_mode]['label']}, pre-quantized folder", flags=[],
                                    folder=_mode)
MODE_ORDER = ["pytorch", "exact", "int8", "int8-folder", "fp16", "fp16-folder", "int4", "int4-folder"]
# `--peer llama.cpp`: the decoder as GGUF in the format of each arcana mode's bits per weight
# (parity/bench/llamacpp_peer.py), timed on the same positions; not a mode of --modes.
for _fmt in llamacpp_peer.FORMATS:
    MODES[f"llama.cpp-{_fmt}"] = dict(label=f"llama.cpp {_fmt}", side="llama.cpp", format=_fmt)

FILLER = [
    "The pier is made of old wooden planks that turn slippery after rain.",
    "A narrow path runs along the shore between tall pine trees and the water.",
    "Small boats are tied to posts at the end of the dock in the early morning.",
    "The lake is calm, but the wind can rise quickly in the afternoon.",
    "Mountains covered with forest stand behind the lake under a cloudy sky.",
    "There is no railing on either side of the dock, and the water is deep there.",
    "Visitors often come to swim, fish, or watch the sunset from the end of the pier.",
    "The nearest town is a long drive away, and the phone signal is weak near the shore.",
]


def fail(message):
    sys.stderr.write(f"bench: {message}\n")
    sys.exit(2)


# --------------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------------
def physical_cores():
    cores, logical = set(), 0
    phys = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor":
                    logical += 1
                elif key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
    except OSError:
        pass
    return len(cores) or logical or os.cpu_count() or 1


def memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def git_commit():
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(threads):
    import provenance
    import torch
    import transformers
    facts = {k[len("machine."):]: v for k, v in provenance.machine().items()}
    facts.update(physical_cores=physical_cores(), logical_cpus=os.cpu_count(), memory_gib=memory_gib(),
                 threads=threads, transformers=transformers.__version__, torch=torch.__version__,
                 commit=git_commit())
    return facts


def measure_bandwidth(threads, megabytes, repeats=7):
    """Streaming read bandwidth: `.sum()` over a fp32 tensor far larger than the caches, with the
    benchmark's thread count; the median of `repeats` passes after one warm-up."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(megabytes * 2 ** 20 // 4, dtype=torch.float32)
        x.sum()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - t0)
        nbytes = x.numel() * 4
        del x
    finally:
        torch.set_num_threads(previous)
    return {"gb_per_s": nbytes / statistics.median(times) / 1e9, "bytes": nbytes, "passes": repeats,
            "method": f"torch fp32 .sum() over {nbytes / 1e9:.2f} GB, {threads} threads, median of {repeats}"}


# --------------------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------------------
def checkpoint_name(sizes, seed, dtype="fp32"):
    # "v1" in the name: the release's CLI (and arcana) pick the llava_v1 template from the folder name
    return ("arcana-v1-bench"
            f"-clip{sizes['vision_hidden']}x{sizes['vision_mlp']}x{sizes['vision_layers']}h{sizes['vision_heads']}"
            f"-img{sizes['image_size']}"
            f"-llm{sizes['llm_hidden']}x{sizes['llm_mlp']}x{sizes['llm_layers']}h{sizes['llm_heads']}"
            f"-{dtype}-s{seed}-l{CHECKPOINT_LAYOUT}")


def register_preset(sizes, dtype="fp32"):
    import export
    name = "bench-" + "-".join(str(sizes[k]) for k in sorted(sizes))
    export.PRESETS[name] = dict(
        clip=dict(hidden_size=sizes["vision_hidden"], intermediate_size=sizes["vision_mlp"],
                  num_attention_heads=sizes["vision_heads"], num_hidden_layers=sizes["vision_layers"]),
        image_size=sizes["image_size"], select_layer=-2, projector="mlp2x_gelu",
        llm=dict(hidden_size=sizes["llm_hidden"], intermediate_size=sizes["llm_mlp"],
                 num_hidden_layers=sizes["llm_layers"], num_attention_heads=sizes["llm_heads"],
                 num_key_value_heads=sizes["llm_heads"], vocab_size=VOCAB),
        # two shards as the 7B uploads; lm_head scaled as in cli-tiny so greedy choices have margins
        dtype=dtype, vision_in_main=False, shards=max(2, sizes["llm_layers"] // 4), tokenizer=True, fixture=False,
        lm_head_scale=4.0)
    return name


def ensure_prequantized(checkpoint, mode, converter):
    """The pre-quantized folder of `checkpoint` in `mode` (merged), made once by `converter` beside it and made
    again when the converter's version differs from the folder's."""
    folder = f"{checkpoint.rstrip('/')}.{mode}-merged"
    manifest = os.path.join(folder, "arcana-quantized.json")
    version = subprocess.run([converter, "--version"], capture_output=True, text=True).stdout.split()[-1:]
    if os.path.isfile(manifest):
        with open(manifest) as f:
            if [json.load(f).get("arcana_version")] == version:
                return folder
    print(f"bench: writing the pre-quantized {mode} folder {folder}...", file=sys.stderr, flush=True)
    cmd = [converter, "--input", checkpoint, "--output", folder, "--quantize", mode, "--merge-lora", "--force"]
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    if rc != 0:
        fail(f"{' '.join(cmd)} failed (exit {rc})")
    return folder


def make_checkpoint_main(spec_json, out):
    """Child process: writes the checkpoint (its memory goes back to the system when it exits)."""
    import export
    spec = json.loads(spec_json)
    preset = register_preset(spec["sizes"], spec.get("dtype", "fp32"))
    export.make_checkpoint(preset, spec["seed"], out, tokenizer_model=spec["tokenizer_model"])
    return 0


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def ensure_checkpoint(sizes, seed, cache, dtype="fp32"):
    import export
    path = os.path.join(cache, checkpoint_name(sizes, seed, dtype))
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"bench: reusing checkpoint {path}", file=sys.stderr)
        return path
    try:
        tokenizer_model = export.default_tokenizer_model()
    except FileNotFoundError as e:
        fail(f"the benchmark checkpoint needs a real SentencePiece tokenizer: {e}")
    os.makedirs(cache, exist_ok=True)
    need = estimate_checkpoint_bytes(sizes, dtype)
    free = shutil.disk_usage(cache).free
    if free < need * 1.1:
        fail(f"making the checkpoint needs about {need / 1e9:.1f} GB in {cache}; {free / 1e9:.1f} GB free")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(f"bench: making checkpoint {path} (about {need / 1e9:.1f} GB; once)", file=sys.stderr)
    t0 = time.perf_counter()
    spec = json.dumps({"sizes": sizes, "seed": seed, "tokenizer_model": tokenizer_model, "dtype": dtype})
    rc = subprocess.run([sys.executable, os.path.abspath(__file__), "_make-checkpoint", spec, partial]).returncode
    if rc != 0:
        shutil.rmtree(partial, ignore_errors=True)
        fail(f"making the checkpoint failed (exit {rc})")
    os.rename(partial, path)  # only a complete folder carries the final name
    print(f"bench: made {dir_bytes(path) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def estimate_checkpoint_bytes(s, dtype="fp32"):
    v, vm, vl = s["vision_hidden"], s["vision_mlp"], s["vision_layers"]
    clip_layer = 4 * v * v + 2 * v * vm
    ladder_layer = 4 * v * v + 2 * v * vm  # cross attention + MLP per ladder layer
    vision = vl * (clip_layer + ladder_layer) + (s["image_size"] // 14) ** 2 * v + 3 * 14 * 14 * v
    h, m, n = s["llm_hidden"], s["llm_mlp"], s["llm_layers"]
    lora = (64 + 192) * (4 * 2 * h + 3 * (h + m))
    llm = n * (4 * h * h + 3 * h * m + lora) + 2 * VOCAB * h
    projector = v * h + h * h
    return (4 if dtype == "fp32" else 2) * (vision + llm + projector)


# --------------------------------------------------------------------------------------------------------
# bytes per decoded token (roofline)
# --------------------------------------------------------------------------------------------------------
def tensor_shapes(checkpoint):
    from safetensors import safe_open
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    shapes = {}
    for name in files:
        with safe_open(os.path.join(checkpoint, name), "pt") as f:
            for k in f.keys():
                shapes[k] = f.get_slice(k).get_shape()
    return shapes


def stored_bytes(form, out_dim, in_dim):
    """Bytes of an [out, in] weight as arcana stores it: int8 with an fp32 scale per row; int4 codes with
    an fp32 scale and low end per group of INT4_GROUP inputs; fp16 with an fp32 bias vector."""
    numel = out_dim * in_dim
    if form == "int8":
        return numel + out_dim * 4
    if form == "int4":
        return numel / 2 + out_dim * (in_dim // INT4_GROUP) * 8
    if form == "fp16":
        return numel * 2 + out_dim * 4
    return numel * 4


def decode_bytes(shapes, config, mode, position):
    """Bytes one decode step must read at `position` cached positions: every decoder projection and
    lm_head in the mode's form, the MM-LoRA branches when unmerged, norms, one embedding row, and the
    KV cache (fp32, or the mode's `kv` bytes per value)."""
    spec = MODES[mode]
    parts = {"projections": 0.0, "lora": 0.0, "lm_head_embedding_norms": 0.0, "kv_cache": 0.0}
    for name, shape in shapes.items():
        if not name.startswith("model.layers.") and name not in ("lm_head.weight", "model.norm.weight"):
            continue
        numel = 1
        for d in shape:
            numel *= d
        if "_Slora_" in name:
            if spec["lora"]:
                parts["lora"] += numel * 4
        elif name.endswith("_proj.weight"):
            parts["projections"] += stored_bytes(spec["base"], *shape)
        elif name == "lm_head.weight":
            parts["lm_head_embedding_norms"] += stored_bytes(spec["head"], *shape)
        else:
            parts["lm_head_embedding_norms"] += numel * 4
    hidden = config["hidden_size"]
    parts["lm_head_embedding_norms"] += hidden * 4  # the new token's embedding row
    kv_dim = hidden // config["num_attention_heads"] * config.get("num_key_value_heads",
                                                                  config["num_attention_heads"])
    parts["kv_cache"] = 2 * config["num_hidden_layers"] * position * kv_dim * spec.get("kv", 4)
    return sum(parts.values()), parts


def prompt_positions(checkpoint, question, visual_tokens):
    """Prefill positions of a question with the image, in the llava_v1 template."""
    import arcana_ref_conversation as conv
    from cli_reference import tokenizer_image_token
    tok = _tokenizer(checkpoint)
    template = conv.TEMPLATES[CONV_MODE]
    user = conv.Message(template.roles[0], conv.cli_user_message(question, True, False))
    prompt = conv.render_prompt(template, [user, conv.Message(template.roles[1], None)])
    ids = tokenizer_image_token(prompt, tok)
    n_images = ids.count(conv.IMAGE_TOKEN_INDEX)
    return len(ids) - n_images + n_images * visual_tokens


_TOKENIZERS = {}


def _tokenizer(checkpoint):
    if checkpoint not in _TOKENIZERS:
        from transformers import AutoTokenizer
        _TOKENIZERS[checkpoint] = AutoTokenizer.from_pretrained(checkpoint, use_fast=False)
    return _TOKENIZERS[checkpoint]


def long_question(checkpoint, visual_tokens, extra_tokens):
    """The question followed by notes (fixed sentences, numbered) until the prompt is `extra_tokens`
    positions longer than the plain question's."""
    target = prompt_positions(checkpoint, QUESTION, visual_tokens) + extra_tokens
    notes, k = [], 0
    while True:
        notes.append(f"Note {k + 1}: {FILLER[k % len(FILLER)]}")
        k += 1
        text = QUESTION + " Here are my notes from earlier visits. " + " ".join(notes)
        if prompt_positions(checkpoint, text, visual_tokens) >= target:
            return text


# --------------------------------------------------------------------------------------------------------
# running one process
# --------------------------------------------------------------------------------------------------------
def run_measured(cmd, env, timeout):
    """Runs `cmd` as a child; returns (exit status, stdout, stderr, wall seconds, peak RSS bytes, timed out)
    with the peak RSS from the child's own rusage (os.wait4), measured the same way for both sides."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        status = rusage = None
        while True:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                status, rusage = st, ru
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                wall, rusage.ru_maxrss * 1024, wall > timeout)


class Launcher:
    """Starts the measured processes from a small helper process. On Linux a child's ru_maxrss is at least
    the RSS of the process that forked it (exec keeps the old memory map's high-water mark), so children
    forked from this driver, which holds torch and the bandwidth probe, would all report its size."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_launcher"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, cmd, env, timeout):
        self.proc.stdin.write(json.dumps({"cmd": cmd, "env": env, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            fail("the process launcher stopped")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def launcher_main():
    """Child process: runs one command per JSON line on stdin, answers one JSON line on stdout."""
    for line in sys.stdin:
        req = json.loads(line)
        rc, out, err, wall, rss, timed_out = run_measured(req["cmd"], req["env"], req["timeout"])
        sys.stdout.write(json.dumps({"rc": rc, "stdout": out, "stderr": err, "wall": wall, "rss": rss,
                                     "timed_out": timed_out}) + "\n")
        sys.stdout.flush()
    return 0


def failure_line(rc, stderr, timed_out, timeout):
    if timed_out:
        return f"timed out after {timeout} s"
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    pick = next((x for x in lines if x.lower().startswith(("error", "pytorch_side:", "traceback"))), None)
    if pick and pick.lower().startswith("traceback"):
        pick = lines[-1]  # the exception itself
    pick = pick or (lines[0] if lines else None)
    if rc < 0:
        return f"killed by signal {-rc}" + (f" ({pick})" if pick else "")
    return pick or f"exit status {rc}"


def checkpoint_numel(checkpoint):
    """Elements of every tensor of a model folder and its vision tower folder, from the safetensors headers."""
    total = 0
    for d, _, files in os.walk(checkpoint):
        for f in files:
            if f.endswith(".safetensors"):
                with open(os.path.join(d, f), "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
                total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


# Modes whose weights are all fp32 in memory: they cannot run where those do not fit.
FP32_MODES = ("pytorch", "exact")


def run_peer(mode, ctx, workload):
    """One llama.cpp process (parity/bench/llamacpp_side.py) on the workload's positions; a crash with its
    extra CPU buffers on (seen with AMX) is run again with them off, and the row says so."""
    fmt = MODES[mode]["format"]
    row = {"mode": mode, "workload": workload}
    if fmt not in ctx["ggufs"]:
        row["error"] = ctx["peer_skipped"].get(fmt, "not made")
        return row
    tokens = llamacpp_peer.prompt_tokens(ctx["positions"][workload], ctx["bos_id"], ctx["filler_ids"])
    fd, token_file = tempfile.mkstemp(suffix=".json", prefix="bench-llamacpp-tokens-")
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    fd, out_file = tempfile.mkstemp(suffix=".json", prefix="bench-llamacpp-")
    os.close(fd)
    cmd = [ctx["peer_python"], os.path.join(HERE, "llamacpp_side.py"), "--model", ctx["ggufs"][fmt], "--tokens",
           token_file, "--new-tokens", str(ctx["new_tokens"]), "--threads", str(ctx["threads"]), "--out", out_file]
    try:
        res = ctx["launcher"].run(cmd, ctx["env"], ctx["timeout"])
        if res["rc"] < 0 and not res["timed_out"]:
            first = failure_line(res["rc"], res["stderr"], False, ctx["timeout"])
            cmd.append("--no-extra-buffers")
            res = ctx["launcher"].run(cmd, ctx["env"], ctx["timeout"])
            row["note"] = f"run again with use_extra_bufts = false after: {first}"
        row.update(wall_seconds=res["wall"], peak_rss_bytes=res["rss"], command=" ".join(map(shlex.quote, cmd)))
        if res["rc"] != 0:
            row["error"] = failure_line(res["rc"], res["stderr"], res["timed_out"], ctx["timeout"])
            row["stderr_tail"] = res["stderr"][-2000:]
            return row
        with open(out_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        row["error"] = f"unreadable output: {e}"
        return row
    finally:
        for path in (token_file, out_file):
            if os.path.exists(path):
                os.remove(path)
    row.update(load_seconds=data["load_seconds"], image_preprocess_seconds=0.0, encode_seconds=0.0,
               prefill_seconds=data["prefill_seconds"], decoder_prefill_seconds=data["prefill_seconds"],
               decode_seconds=data["decode_seconds"], ttft_seconds=data["prefill_seconds"],
               new_tokens=data["new_tokens"], decode_ms_per_token=data["decode_ms_per_token"],
               prefill_positions=data["prefill_positions"], output_ids=data["output_ids"],
               llama_cpp={k: data[k] for k in ("n_batch", "n_ubatch", "flash_attn_type", "use_extra_bufts",
                                               "llama_cpp_counters", "system_info")})
    return row


def peer_same_function(ctx, new_tokens=8):
    """Whether the GGUF decoder computes arcana's: greedy ids of a text-only prompt from arcana exact
    with the language branch merged and no visual positions (`--mask-policy image`), against llama.cpp
    f32 on the same ids; `checked` false, with why, when either cannot run here."""
    if "f32" not in ctx["ggufs"]:
        return {"checked": False, "why": ctx["peer_skipped"].get("f32", "no f32 GGUF")}
    cmd = [ctx["binary"], "--model-path", ctx["checkpoint"], "--prompt", QUESTION, "--conv-mode", CONV_MODE,
           "--temperature", "0", "--max-new-tokens", str(new_tokens), "--json", "--merge-lora", "--mask-policy", "image"]
    if ctx["rust_threads_flag"]:
        cmd += ["--threads", str(ctx["threads"])]
    res = ctx["launcher"].run(cmd, ctx["env"], ctx["timeout"])
    if res["rc"] != 0:
        return {"checked": False, "why": "arcana exact: " + failure_line(res["rc"], res["stderr"], res["timed_out"],
                                                                       ctx["timeout"])}
    turn = json.loads(res["stdout"])["turns"][0]
    ours = turn["output_ids"][1:]
    fd, token_file = tempfile.mkstemp(suffix=".json", prefix="bench-llamacpp-tokens-")
    with os.fdopen(fd, "w") as f:
        json.dump(turn["input_ids"], f)
    fd, out_file = tempfile.mkstemp(suffix=".json", prefix="bench-llamacpp-")
    os.close(fd)
    try:
        cmd = [ctx["peer_python"], os.path.join(HERE, "llamacpp_side.py"), "--model", ctx["ggufs"]["f32"], "--tokens",
               token_file, "--new-tokens", str(new_tokens), "--threads", str(ctx["threads"]), "--out", out_file]
        res = ctx["launcher"].run(cmd, ctx["env"], ctx["timeout"])
        if res["rc"] != 0:
            return {"checked": False, "why": "llama.cpp f32: " + failure_line(res["rc"], res["stderr"],
                                                                            res["timed_out"], ctx["timeout"])}
        with open(out_file) as f:
            theirs = json.load(f)["output_ids"]
    finally:
        for path in (token_file, out_file):
            os.remove(path)
    return {"checked": True, "equal": ours == theirs, "arcana_exact": ours, "llama_cpp_f32": theirs,
            "prompt_tokens": len(turn["input_ids"])}


def run_mode(mode, ctx, question, workload):
    spec = MODES[mode]
    if spec["side"] == "llama.cpp":
        return run_peer(mode, ctx, workload)
    if mode in FP32_MODES and ctx["dtype"] == "fp32" and ctx["device"] == "cpu":
        need, have = ctx["numel"] * 4, available_bytes()
        if have is not None and need > 0.9 * have:
            return {"mode": mode, "workload": workload,
                    "error": f"cannot load here: its fp32 weights alone take {need / 1e9:.1f} GB, this machine has "
                             f"{have / 1e9:.1f} GB available (not run, rather than swap)"}
    if spec["side"] == "pytorch":
        fd, out_file = tempfile.mkstemp(suffix=".json", prefix="bench-pytorch-")
        os.close(fd)
        cmd = [sys.executable, os.path.join(HERE, "pytorch_side.py"), "--model-path", ctx["checkpoint"],
               "--image-file", ctx["image"], "--prompt", question, "--max-new-tokens", str(ctx["new_tokens"]),
               "--conv-mode", CONV_MODE, "--threads", str(ctx["threads"]), "--out", out_file]
        if ctx["arcana_src"]:
            cmd += ["--arcana-src", ctx["arcana_src"]]
        if ctx["device"] != "cpu" or ctx["dtype"] != "fp32":
            cmd += ["--device", ctx["device"], "--dtype", ctx["dtype"]]
    else:
        out_file = None
        model = ctx["folders"][spec["folder"]] if "folder" in spec else ctx["checkpoint"]
        cmd = [ctx["binary"], "--model-path", model, "--image-file", ctx["image"], "--prompt", question,
               "--conv-mode", CONV_MODE, "--temperature", "0", "--max-new-tokens", str(ctx["new_tokens"]), "--json"]
        if ctx["rust_threads_flag"]:
            cmd += ["--threads", str(ctx["threads"])]
        cmd += spec["flags"]
        if ctx["device"] != "cpu" or ctx["dtype"] != "fp32":
            cmd += ["--device", ctx["device"], "--dtype", ctx["dtype"]]
    res = ctx["launcher"].run(cmd, ctx["env"], ctx["timeout"])
    rc, stdout, stderr, wall, rss, timed_out = (res["rc"], res["stdout"], res["stderr"], res["wall"], res["rss"],
                                                res["timed_out"])
    row = {"mode": mode, "workload": workload, "wall_seconds": wall, "peak_rss_bytes": rss,
           "command": " ".join(shlex.quote(c) if len(c) < 200 else "'<long prompt>'" for c in cmd)}
    try:
        if rc != 0:
            row["error"] = failure_line(rc, stderr, timed_out, ctx["timeout"])
            row["stderr_tail"] = stderr[-2000:]
            return row
        if out_file:
            with open(out_file) as f:
                data = json.load(f)
            turn = data
        else:
            data = json.loads(stdout)
            turn = data["turns"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        row["error"] = f"unreadable output: {e}"
        row["stderr_tail"] = stderr[-2000:]
        return row
    finally:
        if out_file and os.path.exists(out_file):
            os.remove(out_file)
    ids = turn["output_ids"]
    new = max(len(ids) - 1, 0)
    row.update(
        load_seconds=data["load_seconds"],
        image_preprocess_seconds=data["image_preprocess_seconds"],
        prefill_seconds=turn["prefill_seconds"],
        decode_seconds=turn["decode_seconds"],
        ttft_seconds=data["image_preprocess_seconds"] + turn["prefill_seconds"],
        encode_seconds=turn.get("encode_seconds"),
        decoder_prefill_seconds=(turn["prefill_seconds"] - turn["encode_seconds"]) if "encode_seconds" in turn
        else None,
        new_tokens=new,
        decode_ms_per_token=1000 * turn["decode_seconds"] / (new - 1) if new > 1 else None,
        prefill_positions=turn.get("prefill_positions"),
        output_ids=ids,
    )
    for key in ("implementation", "low_cpu_mem_usage", "quantization"):
        if key in data:
            row[key] = data[key]
    return row


# --------------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------------
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def agreement(ids, ref):
    """(leading new tokens equal, positions equal, compared) over the new tokens (BOS excluded)."""
    a, b = ids[1:], ref[1:]
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return prefix, sum(1 for i in range(n) if a[i] == b[i]), max(len(a), len(b))


def summarize(runs, modes, workloads, repeat, bandwidth, shapes, config):
    ok = [r for r in runs if "error" not in r]
    by = {}
    for r in ok:
        by.setdefault((r["mode"], r["workload"], r["repeat"]), r)
    summary = {}
    for mode in modes:
        s = {"label": MODES[mode]["label"]}
        errors = [r["error"] for r in runs if r["mode"] == mode and "error" in r]
        if errors:
            s["error"] = errors[0]
        if not any(r["mode"] == mode for r in ok):
            summary[mode] = s
            continue
        metric = {}
        for k in range(repeat):
            rows = [by.get((mode, w, k)) for w in workloads]
            rows = [r for r in rows if r]
            metric.setdefault("load_seconds", []).extend(r["load_seconds"] for r in rows)
            metric.setdefault("peak_rss_bytes", []).append(max(r["peak_rss_bytes"] for r in rows) if rows else None)
            for w in workloads:
                r = by.get((mode, w, k))
                metric.setdefault(f"ttft_seconds@{w}", []).append(r["ttft_seconds"] if r else None)
                metric.setdefault(f"decode_ms_per_token@{w}", []).append(r["decode_ms_per_token"] if r else None)
                for part in ("encode_seconds", "decoder_prefill_seconds"):
                    metric.setdefault(f"{part}@{w}", []).append(r.get(part) if r else None)
        s["median"] = {m: median(v) for m, v in metric.items()}
        s["samples"] = metric
        # ratios against PyTorch from the same repeat, then the median over repeats
        if mode != "pytorch" and "pytorch" in modes:
            ratios = {}
            for k in range(repeat):
                ours = [by.get((mode, w, k)) for w in workloads]
                theirs = [by.get(("pytorch", w, k)) for w in workloads]
                pairs = {
                    "load_seconds": ([r["load_seconds"] for r in ours if r], [r["load_seconds"] for r in theirs if r]),
                    "peak_rss_bytes": ([r["peak_rss_bytes"] for r in ours if r],
                                       [r["peak_rss_bytes"] for r in theirs if r]),
                }
                for w, a, b in zip(workloads, ours, theirs):
                    pairs[f"ttft_seconds@{w}"] = ([a["ttft_seconds"]] if a else [], [b["ttft_seconds"]] if b else [])
                    pairs[f"decode_ms_per_token@{w}"] = ([a["decode_ms_per_token"]] if a else [],
                                                         [b["decode_ms_per_token"]] if b else [])
                for m, (a, b) in pairs.items():
                    a, b = [x for x in a if x], [x for x in b if x]
                    agg = max if m == "peak_rss_bytes" else statistics.mean
                    if a and b:
                        ratios.setdefault(m, []).append(agg(a) / agg(b))
            s["ratio_vs_pytorch"] = {m: median(v) for m, v in ratios.items()}
        # roofline: bytes per token over the bandwidth, against the measured time per token
        s["roofline"] = {}
        for w in (workloads if MODES[mode]["side"] != "llama.cpp" else []):
            r0 = next((by[(mode, w, k)] for k in range(repeat) if (mode, w, k) in by), None)
            ms = s["median"].get(f"decode_ms_per_token@{w}")
            if not r0 or not ms or not r0.get("prefill_positions"):
                continue
            position = r0["prefill_positions"] + r0["new_tokens"] / 2
            nbytes, parts = decode_bytes(shapes, config, mode, position)
            bound_ms = 1000 * nbytes / (bandwidth["gb_per_s"] * 1e9)
            s["roofline"][w] = {"mean_position": position, "bytes_per_token": nbytes, "bytes_parts": parts,
                                "bound_ms_per_token": bound_ms, "share": bound_ms / ms}
        summary[mode] = s
    # ids: exact against PyTorch; the fast modes against exact
    ids = {}
    for w in workloads:
        first = {m: next((by[(m, w, k)]["output_ids"] for k in range(repeat) if (m, w, k) in by), None) for m in modes}
        stable = {m: len({tuple(by[(m, w, k)]["output_ids"]) for k in range(repeat) if (m, w, k) in by}) <= 1
                  for m in modes}
        for m in modes:
            entry = {"output_ids": first[m], "same_in_every_repeat": stable[m]}
            if first[m] is None or MODES[m]["side"] == "llama.cpp":
                continue
            if m == "exact" and first.get("pytorch"):
                entry["equals_pytorch"] = first[m] == first["pytorch"]
            at_load = MODES[m].get("folder")
            if at_load and first.get(at_load):
                entry["equals_quantized_at_load"] = first[m] == first[at_load]
            if m not in ("pytorch", "exact") and first.get("exact"):
                prefix, same, total = agreement(first[m], first["exact"])
                entry["vs_exact"] = {"prefix": prefix, "same": same, "of": total}
            ids.setdefault(m, {})[w] = entry
    for m, per in ids.items():
        summary.setdefault(m, {})["ids"] = per
    return summary


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_ratio(x):
    return "" if x is None else f" ({x:.2f}x)"


def table(summary, modes, workloads, positions):
    w_short, w_long = workloads
    head = ["mode", "load s", f"TTFT@{positions[w_short]} s", f"TTFT@{positions[w_long]} s",
            f"decode@{positions[w_short]} ms/tok",
            f"decode@{positions[w_long]} ms/tok", "peak RSS GB", "ids",
            f"roofline@{positions[w_short]}", f"roofline@{positions[w_long]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode in modes:
        s = summary.get(mode, {})
        if "median" not in s:
            lines.append(f"| {MODES[mode]['label']} | failed: {s.get('error', 'no run')} |" + " |" * (len(head) - 2))
            continue
        med, rat = s["median"], s.get("ratio_vs_pytorch", {})
        rss = med["peak_rss_bytes"]
        cells = [
            MODES[mode]["label"] + (f" (failed once: {s['error']})" if "error" in s else ""),
            fmt(med["load_seconds"]) + fmt_ratio(rat.get("load_seconds")),
            fmt(med.get(f"ttft_seconds@{w_short}")) + fmt_ratio(rat.get(f"ttft_seconds@{w_short}")),
            fmt(med.get(f"ttft_seconds@{w_long}")) + fmt_ratio(rat.get(f"ttft_seconds@{w_long}")),
            fmt(med.get(f"decode_ms_per_token@{w_short}"), 1) + fmt_ratio(rat.get(f"decode_ms_per_token@{w_short}")),
            fmt(med.get(f"decode_ms_per_token@{w_long}"), 1) + fmt_ratio(rat.get(f"decode_ms_per_token@{w_long}")),
            fmt(rss / 1e9 if rss else None) + fmt_ratio(rat.get("peak_rss_bytes")),
            ids_cell(mode, s.get("ids", {}), workloads),
        ]
        for w in workloads:
            roof = s.get("roofline", {}).get(w)
            cells.append(f"{100 * roof['share']:.0f}%" if roof else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peer_table(summary, modes, workloads, positions):
    """Each arcana mode beside llama.cpp's format of the same bits per weight: decode, the decoder's
    prefill of the same positions (arcana's without its vision encode, which is its own column), load,
    peak RSS; (Nx) is arcana's median over llama.cpp's."""
    head = ["arcana mode", "llama.cpp"]
    for w in workloads:
        head.append(f"decode@{positions[w]} ms/tok")
    for w in workloads:
        head.append(f"decoder prefill@{positions[w]} s")
    head += ["arcana vision encode s", "load s", "peak RSS GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pair(a, b, digits=2):
        if a is None or b is None:
            return f"{fmt(a, digits)} / {fmt(b, digits)}"
        return f"{a:.{digits}f} / {b:.{digits}f} ({a / b:.2f}x)"

    for mode in modes:
        peer = llamacpp_peer.PAIRS.get(mode)
        if peer is None:
            continue
        ours, theirs = summary.get(mode, {}), summary.get(f"llama.cpp-{peer}", {})
        if "median" not in theirs:
            lines.append(f"| {MODES[mode]['label']} | {peer}: {theirs.get('error', 'no run')} |" + " |" * (len(head) - 2))
            continue
        if "median" not in ours:
            lines.append(f"| {MODES[mode]['label']}: {ours.get('error', 'no run')} | {peer} |" + " |" * (len(head) - 2))
            continue
        a, b = ours["median"], theirs["median"]
        cells = [MODES[mode]["label"], peer]
        cells += [pair(a.get(f"decode_ms_per_token@{w}"), b.get(f"decode_ms_per_token@{w}"), 1) for w in workloads]
        cells += [pair(a.get(f"decoder_prefill_seconds@{w}"), b.get(f"decoder_prefill_seconds@{w}")) for w in workloads]
        cells.append(fmt(a.get(f"encode_seconds@{workloads[0]}")))
        cells.append(pair(a.get("load_seconds"), b.get("load_seconds")))
        ra, rb = a.get("peak_rss_bytes"), b.get("peak_rss_bytes")
        cells.append(pair(ra / 1e9 if ra else None, rb / 1e9 if rb else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ids_cell(mode, ids, workloads):
    parts = []
    for w in workloads:
        e = ids.get(w)
        if not e:
            continue
        if mode == "pytorch":
            parts.append("reference")
            break
        if "equals_pytorch" in e:
            parts.append(f"{w}: {'= PyTorch' if e['equals_pytorch'] else 'DIFFER from PyTorch'}")
        elif "equals_quantized_at_load" in e:
            same = e["equals_quantized_at_load"]
            parts.append(f"{w}: {'= quantized at load' if same else 'DIFFER from quantized at load'}")
        elif "vs_exact" in e:
            v = e["vs_exact"]
            parts.append(f"{w}: {v['prefix']}/{v['of']} prefix, {v['same']}/{v['of']} same as exact")
        if not e["same_in_every_repeat"]:
            parts.append(f"{w}: varies between repeats")
    return "; ".join(parts) or "-"


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------
def standin_image(cache):
    """waterview.jpg is the release's photo and is not shipped here. Without --image or --arcana-src the
    benchmark uses a generated JPEG of the same size (1000x667): speed does not depend on the pixels."""
    path = os.path.join(cache, "waterview-standin-1000x667.jpg")
    if not os.path.exists(path):
        from PIL import Image, ImageDraw
        im = Image.new("RGB", (1000, 667))
        draw = ImageDraw.Draw(im)
        for y in range(667):
            draw.line([(0, y), (999, y)], fill=(40 + y // 6, 90 + y // 8, 160 - y // 10))
        for k in range(40):
            x = (k * 97) % 1000
            top = 300 + (k * 37) % 200
            draw.rectangle([x, top, x + 60, top + 40 + (k * 53) % 150],
                           fill=((k * 71) % 256, (k * 29) % 256, (k * 13) % 256))
        os.makedirs(cache, exist_ok=True)
        im.save(path + ".part", format="JPEG", quality=90)
        os.replace(path + ".part", path)
    return path


def choose_image(given, arcana_src, cache):
    """The workload's image and where it came from: `given`, else waterview.jpg from the release's
    checkout, else the generated stand-in."""
    if given:
        return os.path.abspath(given), "given"
    waterview = os.path.join(arcana_src or "", "arcana/serve/examples/waterview.jpg")
    if arcana_src and os.path.isfile(waterview):
        return os.path.abspath(waterview), "the release's"
    note = "generated stand-in for waterview.jpg (1000x667; the release's photo is not shipped)"
    print(f"bench: {note}; pass --image or --arcana-src for the photo", file=sys.stderr)
    return os.path.abspath(standin_image(cache)), note


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny widths (336-pixel image kept): a smoke test")
    p.add_argument("--full", action="store_true",
                   help="the released model's shape: 32 decoder layers at 7B width, fp16 on disk in 8 shards "
                        "(about 14 GB, written one shard at a time); the fp32 sides that cannot fit in this "
                        "machine's memory are rows that say how much they would need")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {value} ({SMALL[key]} with --small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="use this model folder instead of making one")
    p.add_argument("--cache", default=os.environ.get("ARCANA_BENCH_CACHE",
                                                     os.path.expanduser("~/.cache/arcana/bench")))
    p.add_argument("--arcana-src", default=None,
                   help="a checkout of syp2ysy/Arcana (its arcana/ package): the PyTorch side runs the release's "
                        "own modules; default the project's parity/arcana_ref")
    p.add_argument("--image", default=None,
                   help="default: waterview.jpg from --arcana-src, else a generated stand-in of its size")
    p.add_argument("--threads", type=int, default=None, help="both sides; default the physical cores")
    p.add_argument("--device", default="cpu", help="both sides: cpu, cuda or cuda:N (GPU runs: modes pytorch,exact)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="both sides' compute dtype")
    p.add_argument("--checkpoint-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="the made checkpoint's dtype on disk (fp16 halves a 7B-shaped one)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--long-extra-tokens", type=int, default=800,
                   help="text added to the question for the long prompt (positions)")
    p.add_argument("--repeat", type=int, default=1, help="alternate the sides K times; medians")
    p.add_argument("--converter", default=None,
                   help="arcana-convert for the pre-quantized folders (default: beside --binary)")
    p.add_argument("--modes", default=",".join(MODE_ORDER), help=f"comma list of {', '.join(MODE_ORDER)}")
    p.add_argument("--binary", default=os.path.join(REPO, "target", "release", "arcana"))
    p.add_argument("--bandwidth-mb", type=int, default=None, help="size of the bandwidth probe (default 2048, "
                                                                   "256 with --small)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per process")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results", "bench.json"))
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless PyTorch and arcana exact both ran and gave the same ids (smoke test)")
    p.add_argument("--checkpoint-only", action="store_true", help="make (or find) the checkpoint, print its path, stop")
    p.add_argument("--prepare-only", action="store_true",
                   help="make (or find) everything the modes read (checkpoint, pre-quantized folders, the peer's "
                        "GGUFs), stop before timing")
    p.add_argument("--peer", choices=["llama.cpp"], default=None,
                   help="also time llama.cpp on the same decoder as GGUF (f32, f16, q8_0, q4_0 beside exact, fp16, "
                        "int8, int4; scripts/setup-llama-cpp.sh builds it once, about 15 minutes on 2 cores)")
    return p.parse_args(argv)


def prepare_peer(modes, checkpoint, threads):
    """The llama.cpp modes paired with `modes` and what running them needs: its environment, the GGUFs
    (a format whose weights cannot fit in this machine's memory is not made; its row says why), the
    prompt's token ids."""
    formats = []
    for m in modes:
        fmt = llamacpp_peer.PAIRS.get(m)
        if fmt and fmt not in formats:
            formats.append(fmt)
    if not formats:
        fail(f"--peer llama.cpp pairs with {', '.join(sorted(set(llamacpp_peer.PAIRS)))}; none in --modes")
    peer_python, llama_cpp_dir = llamacpp_peer.setup()
    shapes = tensor_shapes(checkpoint)
    decoder_numel = sum(math.prod(v) for k, v in shapes.items()
                        if (k.startswith("model.layers.") and "_Slora_" not in k)
                        or k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"))
    skipped = {}
    have = available_bytes()
    if "f32" in formats and have is not None and decoder_numel * 4 > 0.9 * have:
        skipped["f32"] = (f"cannot load here: its f32 weights alone take {decoder_numel * 4 / 1e9:.1f} GB, this machine "
                          f"has {have / 1e9:.1f} GB available (not made, not run)")
    ggufs = llamacpp_peer.ensure_ggufs(checkpoint, peer_python, llama_cpp_dir, threads,
                                       [f for f in formats if f not in skipped])
    tok = _tokenizer(checkpoint)
    version = subprocess.run([peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    ctx = dict(peer_python=peer_python, ggufs=ggufs, peer_skipped=skipped, peer_version=version,
               bos_id=tok.bos_token_id, filler_ids=tok(QUESTION, add_special_tokens=False)["input_ids"])
    return [f"llama.cpp-{f}" for f in formats], ctx


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_make-checkpoint"]:
        return make_checkpoint_main(*argv[1:3])
    if argv[:1] == ["_launcher"]:
        return launcher_main()
    args = parse_args(argv)
    launcher = Launcher()  # first, while this process is still small
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        fail(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODE_ORDER)}")
    if args.repeat < 1 or args.new_tokens < 2:
        fail("--repeat must be at least 1 and --new-tokens at least 2")
    if args.arcana_src is not None and not os.path.isdir(os.path.join(args.arcana_src, "arcana")):
        fail(f"--arcana-src {args.arcana_src}: no arcana/ package there (extract one with "
             f"`git -C <clone of syp2ysy/Arcana> archive HEAD arcana | tar -x -C {args.arcana_src}`)")
    rust_modes = [m for m in modes if MODES[m]["side"] == "rust"]
    if rust_modes and not args.checkpoint_only and not os.access(args.binary, os.X_OK):
        fail(f"no arcana binary at {args.binary}; build it with `cargo build --release --bin arcana` "
             f"(scripts/bench.sh does)")
    args.converter = args.converter or os.path.join(os.path.dirname(args.binary), "arcana-convert")
    folder_modes = [m for m in modes if "folder" in MODES[m]]
    if folder_modes and not args.checkpoint_only and not os.access(args.converter, os.X_OK):
        fail(f"no arcana-convert at {args.converter} for {', '.join(folder_modes)}; build it with "
             f"`cargo build --release -p arcana-convert` (scripts/bench.sh does)")
    if args.image and not os.path.isfile(args.image):
        fail(f"--image {args.image} does not exist")
    if args.checkpoint and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        fail(f"--checkpoint {args.checkpoint}: no config.json there")
    threads = args.threads or physical_cores()

    base = SMALL if args.small else FULL
    if args.full:
        base = dict(FULL, llm_layers=32)
        args.checkpoint_dtype = "fp16"
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    checkpoint = (os.path.abspath(args.checkpoint) if args.checkpoint
                  else ensure_checkpoint(sizes, args.seed, args.cache, args.checkpoint_dtype))
    if args.checkpoint_only:
        print(checkpoint)
        return 0
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(checkpoint, config["mm_vision_tower"], "config.json")) as f:
        vconfig = json.load(f)
    visual_tokens = (vconfig["image_size"] // vconfig["patch_size"]) ** 2 + LADDER_QUERIES

    image, image_note = choose_image(args.image, args.arcana_src, args.cache)

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    rust_threads_flag = False
    if rust_modes:
        helped = subprocess.run([args.binary, "--help"], capture_output=True, text=True, env=env)
        rust_threads_flag = "--threads" in helped.stdout

    questions = {"short": QUESTION,
                 "long": long_question(checkpoint, visual_tokens, args.long_extra_tokens)}
    positions = {w: prompt_positions(checkpoint, q, visual_tokens) for w, q in questions.items()}
    workloads = ["short", "long"]

    folders = {}
    for mode in modes:
        if "folder" in MODES[mode]:
            folders[MODES[mode]["folder"]] = ensure_prequantized(checkpoint, MODES[mode]["folder"], args.converter)
    peer_modes, peer_ctx = [], {}
    if args.peer:
        peer_modes, peer_ctx = prepare_peer(modes, checkpoint, threads)
    if args.prepare_only:
        print(checkpoint)
        return 0

    facts = machine(threads)
    facts["loadavg_start"] = loadavg()
    bandwidth = measure_bandwidth(threads, args.bandwidth_mb or (256 if args.small else 2048))
    print(f"bench: read bandwidth {bandwidth['gb_per_s']:.1f} GB/s ({bandwidth['method']})", file=sys.stderr)
    ctx = dict(checkpoint=checkpoint, numel=checkpoint_numel(checkpoint), folders=folders, image=image, new_tokens=args.new_tokens, threads=threads, env=env,
               positions=positions, **peer_ctx,
               arcana_src=os.path.abspath(args.arcana_src) if args.arcana_src else None, binary=args.binary,
               rust_threads_flag=rust_threads_flag, timeout=args.timeout, launcher=launcher, device=args.device,
               dtype=args.dtype)
    floor = launcher.run(["/bin/true"] if os.path.exists("/bin/true") else [sys.executable, "-c", ""], env, 60)["rss"]
    runs = []
    t_start = time.perf_counter()
    measured = modes + peer_modes
    for k in range(args.repeat):
        order = measured if k % 2 == 0 else measured[::-1]  # alternate, so drift does not favour one side
        for w in workloads:
            for mode in order:
                print(f"bench: repeat {k + 1}/{args.repeat}, {w} prompt ({positions[w]} positions), "
                      f"{MODES[mode]['label']}...", file=sys.stderr, flush=True)
                row = run_mode(mode, ctx, questions[w], w)
                row["repeat"] = k
                runs.append(row)
                if "error" in row:
                    print(f"bench:   failed: {row['error']}", file=sys.stderr)
                else:
                    print(f"bench:   load {row['load_seconds']:.2f} s, TTFT {row['ttft_seconds']:.2f} s, "
                          f"decode {fmt(row['decode_ms_per_token'], 1)} ms/token, "
                          f"peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    same_function = peer_same_function(ctx) if args.peer and "exact" in modes else None
    facts["loadavg_end"] = loadavg()
    launcher.close()
    facts["rss_floor_bytes"] = floor  # what a trivial child reports: the launcher's own size

    shapes = tensor_shapes(checkpoint)
    summary = summarize(runs, measured, workloads, args.repeat, bandwidth, shapes, config)
    entry = "bash scripts/bench.sh" if os.environ.get("ARCANA_BENCH_VIA_SCRIPT") else "python parity/bench/bench.py"
    command = " ".join([entry] + [shlex.quote(a) for a in argv])
    size_gb = dir_bytes(checkpoint) / 1e9
    pytorch_impl = next((r.get("implementation") for r in runs if r["mode"] == "pytorch" and "implementation" in r),
                        None)
    low_mem = next((r.get("low_cpu_mem_usage") for r in runs if r["mode"] == "pytorch" and "implementation" in r),
                   None)

    print(f"\n## arcana vs PyTorch: `{command}`\n")
    print(f"- machine: {facts['cpu']} ({facts['cpu_features']}), {facts['physical_cores']} physical cores, "
          f"{facts['logical_cpus']} logical CPUs, {facts['memory_gib']} GiB; {threads} threads on both sides; "
          f"torch {facts['torch']}, transformers {facts['transformers']}; commit {facts['commit']}")
    print(f"- load average {facts['loadavg_start']} at the start, {facts['loadavg_end']} at the end; "
          f"read bandwidth {bandwidth['gb_per_s']:.1f} GB/s ({bandwidth['method']})")
    print(f"- checkpoint: {checkpoint} ({size_gb:.2f} GB: vision {sizes['vision_hidden']}x{sizes['vision_layers']} "
          f"layers, decoder {config['num_hidden_layers']} layers of width {config['hidden_size']})")
    print(f"- image: {image} ({image_note}); template {CONV_MODE}; greedy, {args.new_tokens} new tokens; "
          f"prompts of {positions['short']} and {positions['long']} positions; {args.repeat} repeat(s), medians")
    if pytorch_impl:
        print(f"- PyTorch side: {pytorch_impl}" + ("" if low_mem is None else
                                                  f"; low_cpu_mem_usage {'on' if low_mem else 'off (no accelerate)'}"))
    if rust_modes:
        print(f"- arcana: {args.binary}; threads by " +
              ("--threads and " if rust_threads_flag else "") + "OMP_NUM_THREADS / MKL_NUM_THREADS")
    print("- TTFT: image preprocessing + vision + prefill to the first token; decode: ms per token after the first; "
          "(Nx): against PyTorch, median over repeats of same-repeat ratios; roofline: bytes a decode step must "
          "read / bandwidth, as a share of the measured time\n")
    print(table(summary, measured, workloads, positions))
    print()
    if args.peer:
        sysinfo = next((r["llama_cpp"]["system_info"] for r in runs if "llama_cpp" in r), "no run")
        extra = next((r["llama_cpp"] for r in runs if "llama_cpp" in r), {})
        print("\n## arcana vs llama.cpp, same run\n")
        print(f"- llama.cpp: llama-cpp-python {peer_ctx['peer_version']} built here from PyPI's source; {sysinfo}")
        print(f"- the decoder as a plain LLaMA (language LoRA merged, visual branch left out), GGUF by llama.cpp's "
              f"converter (examples/convert_legacy_llama.py) and quantizer (its defaults); {threads} threads; "
              f"n_batch {extra.get('n_batch')}, n_ubatch {extra.get('n_ubatch')}; the prompt's positions are tokens "
              f"there, embeddings here; decoder prefill = arcana's prefill less its vision encode")
        if same_function and same_function["checked"]:
            verdict = "equal" if same_function["equal"] else "DIFFERENT"
            print(f"- same decoder: greedy ids of a text-only prompt ({same_function['prompt_tokens']} tokens, "
                  f"{len(same_function['arcana_exact'])} new) from arcana exact (language branch merged, no visual "
                  f"positions) and llama.cpp f32: {verdict}")
        elif same_function:
            print(f"- same decoder: not checked ({same_function['why']})")
        notes = sorted({r["note"] for r in runs if r.get("note")})
        for note in notes:
            print(f"- {note}")
        print()
        print(peer_table(summary, modes, workloads, positions))
        print()

    result = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": facts,
        "bandwidth": bandwidth,
        "checkpoint": {"path": checkpoint, "bytes": dir_bytes(checkpoint), "sizes": sizes, "seed": args.seed,
                       "made_by": None if args.checkpoint
                       else "parity/bench/bench.py (parity/export.py make_checkpoint)"},
        "image": {"path": image, "note": image_note},
        "workload": {"conv_mode": CONV_MODE, "new_tokens": args.new_tokens, "threads": threads,
                     "questions": questions, "prefill_positions": positions, "repeat": args.repeat,
                     "rust_threads_flag": rust_threads_flag},
        "modes": {m: {k: v for k, v in MODES[m].items()} for m in measured},
        "peer": ({"name": args.peer, "version": peer_ctx.get("peer_version"), "ggufs": peer_ctx.get("ggufs"),
                  "skipped": peer_ctx.get("peer_skipped"), "pairs": llamacpp_peer.PAIRS,
                  "same_function": same_function} if args.peer else None),
        "bytes_model": decode_bytes.__doc__.strip() + " Per mode: see `modes` (base, lora, dense, kv).",
        "summary": summary,
        "runs": runs,
        "total_seconds": time.perf_counter() - t_start,
    }
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")
    if args.check:
        problems = [f"{m}: {summary.get(m, {}).get('error', 'no run')}" for m in ("pytorch", "exact")
                    if "median" not in summary.get(m, {})]
        problems += [f"exact ids differ from PyTorch's on the {w} prompt" for w in workloads
                     if not summary.get("exact", {}).get("ids", {}).get(w, {}).get("equals_pytorch")]
        for m in (m for m in modes if "folder" in MODES[m]):
            for w in workloads:
                if not summary.get(m, {}).get("ids", {}).get(w, {}).get("equals_quantized_at_load"):
                    problems.append(f"{m}: ids on the {w} prompt differ from {MODES[m]['folder']} quantized at load "
                                    f"({summary.get(m, {}).get('error', 'or it did not run')})")
        if problems:
            print("bench check failed: " + "; ".join(problems), file=sys.stderr)
            return 1
        print("bench check: PyTorch and arcana exact ran; same ids on both prompts; each pre-quantized folder "
              "gave its mode's ids quantized at load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
