"""llama.cpp as the benchmark's peer (`bash scripts/bench.sh --peer llama.cpp`): the benchmark's decoder
written as a plain LLaMA, converted to GGUF by llama.cpp's own converter and quantized by its own
quantizer, then timed by parity/bench/llamacpp_side.py on the same positions and new tokens as arcana.

The plain LLaMA is the checkpoint's decoder with the language MM-LoRA branch merged into each projection
(`W + scaling * B @ A` in fp32, as `arcana-convert --merge-lora` computes it) and the visual branch left
out: the shapes and the bytes a decoding step reads are those of arcana's merged modes. Each format pairs
with the arcana mode of the same bits per weight: exact fp32 / f32, fp16 weights / f16, int8 / q8_0,
int4 / q4_0 (llama.cpp's defaults for q4_0 keep output.weight at q6_K, as users get it).
Everything made here is cached beside the checkpoint (`<checkpoint>.llama-gguf/`) and made again when
the checkpoint, the exporter's layout or the llama-cpp-python version changes.
"""
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EXPORT_LAYOUT = 1  # bump when the exported plain LLaMA changes

# arcana mode -> (llama.cpp format, how it is made: converter outtype or quantizer ftype name)
PAIRS = {
    "exact": "f32",
    "fp16": "f16",
    "fp16-folder": "f16",
    "int8": "q8_0",
    "int8-folder": "q8_0",
    "int4": "q4_0",
    "int4-folder": "q4_0",
}
FORMATS = ["f32", "f16", "q8_0", "q4_0"]
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def fail(message):
    sys.stderr.write(f"bench: {message}\n")
    sys.exit(2)


def setup():
    """(python of the peer environment, llama.cpp source tree), made by scripts/setup-llama-cpp.sh."""
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup-llama-cpp.sh")], stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        fail(f"scripts/setup-llama-cpp.sh failed (exit {proc.returncode})")
    src = proc.stdout.strip().splitlines()[-1]
    root = os.path.dirname(src)
    return os.path.join(root, "venv", "bin", "python"), os.path.join(src, "vendor", "llama.cpp")


def _shard_files(checkpoint):
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def _checkpoint_stamp(checkpoint, llama_cpp_python):
    """What the GGUFs were made from: the shards' names, sizes and times, the layout and the peer version."""
    files = []
    for name in _shard_files(checkpoint) + ["config.json", "tokenizer.model"]:
        st = os.stat(os.path.join(checkpoint, name))
        files.append([name, st.st_size, int(st.st_mtime)])
    return {"files": files, "export_layout": EXPORT_LAYOUT, "llama_cpp_python": llama_cpp_python}


def export_plain_llama(checkpoint, out):
    """Writes `out` as a Hugging Face LLaMA folder (config.json, tokenizer.model, one safetensors shard
    per decoder layer): the decoder of `checkpoint` with the language LoRA branch merged in fp32, stored
    in fp16 when the checkpoint's weights are fp16 (as arcana's merge keeps a weight's dtype), else fp32.
    One layer in memory at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(checkpoint, "config.json")) as f:
        cfg = json.load(f)
    scaling = float(cfg.get("mm_lora_scaling", 2.0))
    where = {}
    for name in _shard_files(checkpoint):
        with safe_open(os.path.join(checkpoint, name), "pt") as f:
            for k in f.keys():
                where[k] = name
    handles = {}

    def get(key):
        name = where.get(key)
        if name is None:
            fail(f"{checkpoint}: no tensor {key}")
        if name not in handles:
            handles[name] = safe_open(os.path.join(checkpoint, name), "pt")
        return handles[name].get_tensor(key)

    os.makedirs(out, exist_ok=True)
    layers = int(cfg["num_hidden_layers"])
    shards = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    weight_map = {}

    stored = torch.float16 if get("model.layers.0.self_attn.q_proj.weight").dtype == torch.float16 else torch.float32

    def write(tensors, shard):
        tensors = {k: v.to(stored).contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})

    write({k: get(k) for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}, shards[0])
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {f"{p}.{n}.weight": get(f"{p}.{n}.weight") for n in ("input_layernorm", "post_attention_layernorm")}
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            w = get(f"{p}.{proj}.weight").to(torch.float32)
            a = get(f"{p}.{proj}.L_Slora_A.weight").to(torch.float32)
            b = get(f"{p}.{proj}.L_Slora_B.weight").to(torch.float32)
            tensors[f"{p}.{proj}.weight"] = w + (b @ a) * scaling
        write(tensors, shards[i + 1])
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "rms_norm_eps",
            "vocab_size", "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id")
    plain = {k: cfg[k] for k in keys if k in cfg}
    plain.update(architectures=["LlamaForCausalLM"], model_type="llama",
                 torch_dtype="float16" if stored == torch.float16 else "float32",
                 num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                 hidden_act="silu", tie_word_embeddings=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(plain, f, indent=1)
    shutil.copyfile(os.path.join(checkpoint, "tokenizer.model"), os.path.join(out, "tokenizer.model"))


def ensure_ggufs(checkpoint, peer_python, llama_cpp_dir, threads, formats):
    """{format: path} of the checkpoint's decoder in each of `formats` (of FORMATS), made once: f32 and f16
    by llama.cpp's converter, q8_0 and q4_0 by its quantizer from the widest GGUF made."""
    version = subprocess.run([peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    folder = f"{checkpoint.rstrip('/')}.llama-gguf"
    stamp_path = os.path.join(folder, "made-from.json")
    stamp = _checkpoint_stamp(checkpoint, version)
    paths = {fmt: os.path.join(folder, f"decoder-{fmt}.gguf") for fmt in formats}
    made = {}
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            made = json.load(f)
    if made.get("source") != stamp:
        shutil.rmtree(folder, ignore_errors=True)
        made = {"source": stamp, "formats": []}
    missing = [fmt for fmt in FORMATS if fmt in formats and fmt not in made["formats"]]
    if not missing:
        return paths
    os.makedirs(folder, exist_ok=True)
    converted = [fmt for fmt in ("f32", "f16") if fmt in missing]
    if any(fmt in QUANTIZED for fmt in missing) and not any(f in made["formats"] for f in ("f32", "f16")) \
            and not converted:
        converted = ["f16"]  # the quantizer's source
    if converted:
        plain = os.path.join(folder, "plain-llama")
        print(f"bench: writing the decoder as a plain LLaMA (language LoRA merged) in {plain}", file=sys.stderr,
              flush=True)
        rc = subprocess.run([sys.executable, os.path.abspath(__file__), "_export", checkpoint, plain]).returncode
        if rc != 0:
            fail(f"exporting the plain LLaMA failed (exit {rc})")
        env = dict(os.environ, PYTHONPATH=os.path.join(llama_cpp_dir, "gguf-py"))
        converter = os.path.join(llama_cpp_dir, "examples", "convert_legacy_llama.py")
        for fmt in converted:
            print(f"bench: llama.cpp's converter: {fmt}", file=sys.stderr, flush=True)
            out = os.path.join(folder, f"decoder-{fmt}.gguf")
            cmd = [peer_python, converter, plain, "--outtype", fmt, "--vocab-type", "spm", "--outfile", out + ".part"]
            log = os.path.join(folder, f"convert-{fmt}.log")
            with open(log, "w") as f:
                if subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    fail(f"{' '.join(cmd)} failed; its output is in {log}")
            os.replace(out + ".part", out)
            made["formats"].append(fmt)
        shutil.rmtree(plain)
    source = os.path.join(folder, "decoder-f32.gguf" if "f32" in made["formats"] else "decoder-f16.gguf")
    for fmt in (f for f in missing if f in QUANTIZED):
        print(f"bench: llama.cpp's quantizer: {fmt} from {os.path.basename(source)}", file=sys.stderr, flush=True)
        code = ("import ctypes, sys, llama_cpp as L\n"
                "p = L.llama_model_quantize_default_params()\n"
                f"p.ftype = L.{QUANTIZED[fmt]}\n"
                f"p.nthread = {int(threads)}\n"
                "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n")
        out = os.path.join(folder, f"decoder-{fmt}.gguf")
        cmd = [peer_python, "-c", code, source, out + ".part"]
        log = os.path.join(folder, f"quantize-{fmt}.log")
        with open(log, "w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                fail(f"llama.cpp's quantizer failed for {fmt}; its output is in {log}")
        os.replace(out + ".part", out)
        made["formats"].append(fmt)
        made.setdefault("quantized_from", {})[fmt] = os.path.basename(source)
    with open(stamp_path, "w") as f:
        json.dump(made, f)
    return paths


def prompt_tokens(positions, bos_id, filler_ids):
    """`positions` token ids: BOS, then the filler cycled. What fills a position does not change the
    work (the image's positions are embeddings on arcana's side)."""
    out = [bos_id]
    while len(out) < positions:
        out.extend(filler_ids[: positions - len(out)])
    return out


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "_export":
    export_plain_llama(sys.argv[2], sys.argv[3])
