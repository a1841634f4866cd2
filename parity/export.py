#!/usr/bin/env python3
"""Python side of the Arcana parity harness.

Subcommands (see parity/README.md, section "Python exporter"):
  make-checkpoint  write a seeded tiny random checkpoint in the release's layout and tensor names
  reference        run the PyTorch reference (fp32, CPU) on a checkpoint and save named tensors
  fixtures         (re)create tests/fixtures/parity/<preset>/, or --check them against a fresh export
"""
import argparse
import filecmp
import functools
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_FIXTURES = os.path.join(REPO, "tests", "fixtures", "parity")
TOLERANCES = os.path.join(DEFAULT_FIXTURES, "tolerances.json")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, HERE)
import provenance  # noqa: E402

IMAGE_TOKEN_INDEX = -200
BOS, EOS, PAD = 1, 2, 0
VISION_FOLDER = "clip-qladder-tiny"
VISION_PREFIX = "model.vision_tower.vision_tower."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# --------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------
# Vision presets carry a Llama with 0 layers and a 32-token vocabulary, so that the folder is a complete,
# loadable checkpoint while staying small; only the vision tower and the projector are exercised.
VISION_ONLY_LLM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=0, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=32)
TINY_LLM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=128)

PRESETS = {
    "vision-d4-sel-2": dict(
        clip=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=4),
        select_layer=-2, projector="mlp2x_gelu", llm=VISION_ONLY_LLM,
        dtype="fp32", vision_in_main=False, shards=1, batch=2),
    "vision-d3-sel-1": dict(
        clip=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3),
        select_layer=-1, projector="mlp2x_gelu", llm=VISION_ONLY_LLM,
        dtype="fp16", vision_in_main=False, shards=1, batch=2),
    "vision-linear": dict(
        clip=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2),
        select_layer=-2, projector="linear", llm=VISION_ONLY_LLM,
        dtype="bf16", vision_in_main=True, shards=2, batch=1),
    "lm-mha": dict(
        clip=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2),
        select_layer=-2, projector="mlp2x_gelu", llm=TINY_LLM,
        dtype="fp16", vision_in_main=True, shards=2,
        cases=["image-long", "text", "image-at-5", "two-images", "batch2"]),
    "lm-gqa": dict(
        clip=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2),
        select_layer=-2, projector="mlp2x_gelu", llm=dict(TINY_LLM, num_key_value_heads=2),
        dtype="bf16", vision_in_main=False, shards=1, fixture_seed=1,  # seed 0 meets EOS after 4 tokens
        cases=["image-long"]),
    # For the CLI reference (parity/cli_reference.py, parity/cli_fixtures.py): a 32000-token vocabulary that a
    # real SentencePiece model fits, and the tokenizer files beside the weights. No committed fixture.
    "cli-tiny": dict(
        clip=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2),
        select_layer=-2, projector="mlp2x_gelu", llm=dict(TINY_LLM, vocab_size=32000),
        dtype="fp16", vision_in_main=False, shards=1, tokenizer=True, fixture=False, lm_head_scale=4.0),
}
FIXTURE_PRESETS = [name for name, p in PRESETS.items() if p.get("fixture", True)]
FIXTURE_SEED = 0
FIXTURE_NEW_TOKENS = 16
IMAGE_SIZE = 56
PATCH_SIZE = 14


# --------------------------------------------------------------------------------------------------------
# make-checkpoint
# --------------------------------------------------------------------------------------------------------
def _generator(seed: int, stream: str, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{stream}/{name}".encode())) % (2 ** 62))
    return g


def _is_norm(name: str) -> bool:
    return any(k in name for k in ("layer_norm", "layrnorm", "layernorm", "model.norm.", "norm.weight"))


def _init_tensor(name: str, shape, seed: int, stream: str, hidden_size: int) -> torch.Tensor:
    """Seeded float32 values scaled so activations stay O(1); LoRA B matrices are not zero. Drawn and
    scaled in float64, then rounded: ATen's float32 normal sampler differs in the low bits between CPU
    capabilities (its AVX2 and scalar paths), the float64 one does not."""
    return _init_values(name, shape, seed, stream, hidden_size).float()


def _init_values(name: str, shape, seed: int, stream: str, hidden_size: int) -> torch.Tensor:
    g = _generator(seed, stream, name)
    n = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    leaf = name.rsplit(".", 1)[-1]
    if _is_norm(name):
        return 1.0 + 0.1 * n if leaf == "weight" else 0.1 * n
    if name.endswith("embed_tokens.weight") or name.endswith("qladder_embeds"):
        return n
    if name.endswith("class_embedding") or name.endswith("position_embedding.weight"):
        return 0.5 * n
    if name.endswith("lm_head.weight"):
        return n / hidden_size ** 0.5
    if name.endswith("patch_embedding.weight"):
        fan_in = shape[1] * shape[2] * shape[3]
        return n / fan_in ** 0.5
    if leaf == "bias":
        return 0.1 * n
    if "_Slora_B" in name:
        return 0.5 * n / shape[1] ** 0.5
    if len(shape) == 2:
        return n / shape[1] ** 0.5
    raise ValueError(f"no init rule for {name} {tuple(shape)}")


def _vision_config(preset: dict):
    from transformers import CLIPVisionConfig
    cfg = CLIPVisionConfig(
        image_size=preset.get("image_size", IMAGE_SIZE), patch_size=PATCH_SIZE, num_channels=3, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=preset["clip"]["hidden_size"], **preset["clip"])
    cfg.architectures = ["CLIPWithLadderAdapter"]
    return cfg


def _main_config(preset: dict, dtype: str) -> dict:
    llm = preset["llm"]
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": llm["hidden_size"],
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": llm["intermediate_size"],
        "max_position_embeddings": 4096,
        "mm_hidden_size": preset["clip"]["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": preset["projector"],
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": preset["select_layer"],
        "mm_vision_tower": VISION_FOLDER,
        "model_type": "llava_llama",
        "num_attention_heads": llm["num_attention_heads"],
        "num_hidden_layers": llm["num_hidden_layers"],
        "num_key_value_heads": llm["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": DTYPE_NAMES[dtype],
        "transformers_version": "4.37.2",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": llm["vocab_size"],
    }


GENERATION_CONFIG = {
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
    "max_length": 4096,
    "temperature": 0.9,
    "top_p": 0.6,
    "transformers_version": "4.37.2",
}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _save_sharded(makers: dict, element_size: int, out_dir: str, shards: int) -> None:
    """Writes the tensors `makers` draws (name -> (shape, function making it)) into `shards` files, each
    shard's tensors made only when it is written, so that a full-size checkpoint never sits whole in
    memory (the files are the same as writing every tensor at once)."""
    names = list(makers)
    make = lambda group: {n: makers[n][1]() for n in group}  # noqa: E731
    if shards <= 1:
        save_file(make(names), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    sizes = [math.prod(makers[n][0]) * element_size for n in names]
    total = sum(sizes)
    target = total / shards
    groups, acc = [[]], 0
    for n, s in zip(names, sizes):
        if acc >= target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(n)
        acc += s
    while len(groups) < shards:  # tiny models: keep the requested shard count
        groups.append([groups[-2].pop()])
    weight_map = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file(make(group), os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


# --------------------------------------------------------------------------------------------------------
# tokenizer files (presets with `tokenizer=True`)
# --------------------------------------------------------------------------------------------------------
MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"


def _shared_tokenizers_dir() -> str:
    shared = os.environ.get("ARCANA_SHARED") or os.path.join(os.path.dirname(REPO), "shared")
    return os.path.join(shared, "tokenizers")


def _sha256(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def default_tokenizer_model() -> str:
    """The Mistral 7B v0.1 SentencePiece model (vocabulary 32000): scripts/setup-python.sh puts it in
    ~/.cache/arcana/tokenizers/; a copy in the shared tokenizers folder is used when that one is missing."""
    name = "mistral-7b-v0.1-tokenizer.model"
    candidates = [os.path.join(os.environ.get("ARCANA_TOKENIZERS",
                                              os.path.expanduser("~/.cache/arcana/tokenizers")), name),
                  os.path.join(_shared_tokenizers_dir(), name)]
    for path in candidates:
        if os.path.exists(path) and _sha256(path) == MISTRAL_TOKENIZER_SHA256:
            return path
    raise FileNotFoundError(f"no {name} with sha256 {MISTRAL_TOKENIZER_SHA256[:16]}... in {candidates}; "
                            f"run scripts/setup-python.sh")


def llama2_tokenizer_model():
    """The Llama 2 / Vicuna v1.5 SentencePiece model, where a machine has it (optional, never required)."""
    path = os.path.join(_shared_tokenizers_dir(), "llama2-tokenizer.model")
    return path if os.path.exists(path) and _sha256(path) == LLAMA2_TOKENIZER_SHA256 else None


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def write_tokenizer_files(out_dir: str, tokenizer_model: str) -> None:
    """tokenizer.model + the tokenizer_config.json / special_tokens_map.json of the LLaVA-1.5 (Vicuna v1.5)
    uploads: slow LlamaTokenizer, BOS added, no EOS, legacy false, no pad token in the config."""
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>"),
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>"),
    })
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "bos_token": {k: v for k, v in _added_token("<s>").items() if k != "__type"},
        "eos_token": {k: v for k, v in _added_token("</s>").items() if k != "__type"},
        "pad_token": "<unk>",
        "unk_token": {k: v for k, v in _added_token("<unk>").items() if k != "__type"},
    })


def make_checkpoint(preset_name: str, seed: int, out_dir: str, dtype=None, vision_in_main=None, shards=None,
                    tokenizer_model=None):
    from transformers import CLIPImageProcessor, LlamaConfig
    sys.path.insert(0, HERE)
    from arcana_ref.llava import ArcanaForCausalLM
    from arcana_ref.vision import CLIPWithQueryLadder

    preset = PRESETS[preset_name]
    dtype = dtype or preset["dtype"]
    vision_in_main = preset["vision_in_main"] if vision_in_main is None else vision_in_main
    shards = preset["shards"] if shards is None else shards
    tdtype = DTYPES[dtype]
    os.makedirs(out_dir, exist_ok=True)

    # vision-tower folder
    vcfg = _vision_config(preset)
    vdir = os.path.join(out_dir, VISION_FOLDER)
    os.makedirs(vdir, exist_ok=True)
    vcfg.save_pretrained(vdir)
    image_size = vcfg.image_size
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True, resample=3,
    ).save_pretrained(vdir)
    hidden = preset["llm"]["hidden_size"]
    # only the shapes are needed: the meta device allocates nothing (full-size presets are gigabytes)
    with torch.device("meta"):
        vision_shapes = {k: v.shape for k, v in CLIPWithQueryLadder(vcfg).state_dict().items()}
    folder = {k: _init_tensor(k, s, seed, "vision-folder", hidden).to(tdtype).contiguous()
              for k, s in vision_shapes.items()}
    save_file(folder, os.path.join(vdir, "model.safetensors"), metadata={"format": "pt"})
    del folder  # gigabytes at full size; the main checkpoint is drawn next

    # main checkpoint
    cfg = _main_config(preset, dtype)
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(os.path.join(out_dir, "generation_config.json"), GENERATION_CONFIG)
    with torch.device("meta"):
        main_shapes = {k: v.shape for k, v in
                       ArcanaForCausalLM(LlamaConfig.from_dict(cfg), vcfg).state_dict().items()}
    def main_tensor(k, shape):
        t = _init_tensor(k, shape, seed, "main", hidden)
        if k == "lm_head.weight" and "lm_head_scale" in preset:
            t = t * preset["lm_head_scale"]
        return t.to(tdtype).contiguous()

    main = {k: (tuple(shape), functools.partial(main_tensor, k, shape))
            for k, shape in main_shapes.items() if not k.startswith(VISION_PREFIX)}
    def vision_main_tensor(k, shape):
        return _init_tensor(k, shape, seed, "vision-main", hidden).to(tdtype).contiguous()

    if vision_in_main:
        # an independent draw: the copy in the main checkpoint must win over the folder's
        for k, s in vision_shapes.items():
            main[VISION_PREFIX + k] = (tuple(s), functools.partial(vision_main_tensor, k, s))
    _save_sharded(main, torch.tensor([], dtype=tdtype).element_size(), out_dir, shards)
    if preset.get("tokenizer"):
        write_tokenizer_files(out_dir, tokenizer_model or default_tokenizer_model())
    elif tokenizer_model:
        raise ValueError(f"preset {preset_name} has no tokenizer (its vocabulary is {preset['llm']['vocab_size']})")
    return out_dir


# --------------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------------
def case_input_ids(case: str, vocab: int, seed: int):
    """Named prompt shapes; text ids are seeded random in [3, vocab). Returns (ids [B,T], mask or None)."""
    g = torch.Generator()
    g.manual_seed(seed * 7919 + zlib.crc32(case.encode()))

    def text(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    img = [IMAGE_TOKEN_INDEX]
    if case == "image-long":      # image right after a 35-token prefix; 35 + 80 + 561 = 676 >= 675 positions
        rows = [[BOS] + text(34) + img + text(561)]
    elif case == "image-at-35":   # the llava_v1 layout, short question
        rows = [[BOS] + text(34) + img + text(8)]
    elif case == "text":          # no image
        rows = [[BOS] + text(15)]
    elif case == "image-at-5":    # an image not at 35
        rows = [[BOS] + text(4) + img + text(6)]
    elif case == "two-images":
        rows = [[BOS] + text(2) + img + text(3) + img + text(3)]
    elif case == "batch2":        # two prompts, right-padded with pad id 0 and an attention mask
        rows = [[BOS] + text(6) + img + text(4), [BOS] + text(2) + img + text(2)]
    else:
        raise ValueError(f"unknown case {case}")
    return _pad_rows(rows)


def _pad_rows(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    if len(rows) == 1 or all(len(r) == width for r in rows):
        return ids, None
    return ids, mask


def parse_input_ids(spec: str):
    rows = [[int(t) for t in row.replace(",", " ").split()] for row in spec.split(";") if row.strip()]
    return _pad_rows(rows)


class ReleaseModel:
    """Uniform access to the release's own model (imported from a checkout of the release)."""

    def __init__(self, checkpoint: str, src: str, sliced_mask: bool = False, dtype=torch.float32, device="cpu"):
        sys.path.insert(0, os.path.abspath(src))
        from arcana.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
        if sliced_mask:
            self._slice_release_mask()
        cfg = LlavaConfig.from_pretrained(checkpoint)
        tower = cfg.mm_vision_tower
        if not os.path.isabs(tower):
            # the release resolves the tower path against the working directory
            cfg.mm_vision_tower = os.path.join(os.path.abspath(checkpoint), tower)
        self.model = LlavaLlamaForCausalLM.from_pretrained(checkpoint, config=cfg, torch_dtype=dtype)
        self.model.get_model().get_vision_tower().to(device=device, dtype=dtype)
        self.model.to(device)
        self.model.eval()

    @staticmethod
    def _slice_release_mask():
        """Let the release run prefills shorter than 675 positions: hand its SLoRA layers the visual mask
        [35, 675) sliced to the sequence length (everything else stays the release's own code)."""
        from arcana.model.language_model import modeling_llama_mmlora as mm
        original = mm.SLoRA.forward
        if getattr(original, "_sliced", False):
            return

        def forward(self, x, im_mask=None):
            if im_mask is None and x.shape[1] != 1:
                im_mask = torch.zeros([x.shape[0], x.shape[1]], dtype=torch.bool, device=x.device)
                im_mask[:, 35:35 + 576 + 64] = True
            return original(self, x, im_mask)

        forward._sliced = True
        mm.SLoRA.forward = forward

    def vision(self, pixel_values):
        tower = self.model.get_model().get_vision_tower()
        out = tower.vision_tower(pixel_values.to(dtype=tower.dtype), output_hidden_states=True)
        return out, tower.feature_select(out).to(pixel_values.dtype)

    def splice(self, ids, mask, images):
        return self.model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images)


class RefModel:
    def __init__(self, checkpoint: str, dtype=torch.float32, device="cpu"):
        sys.path.insert(0, HERE)
        from arcana_ref.llava import load_arcana
        self.model = load_arcana(checkpoint, dtype).to(device)

    def vision(self, pixel_values):
        tower = self.model.model.vision_tower
        out = tower.run_tower(pixel_values)
        return out, tower.select(out).to(pixel_values.dtype)

    def splice(self, ids, mask, images):
        return self.model.splice(ids, None, mask, None, None, images)


def run_reference(checkpoint, out, seed=0, batch=1, input_ids=None, case=None, new_tokens=16,
                  arcana_src=None, command=None, preset=None, release_sliced_mask=False, device="cpu",
                  dtype="fp32"):
    """With `device`/`dtype` the model runs there in that dtype (weights cast from the checkpoint, pixels
    cast from the fp32 draw as the release's CLI casts them); inputs are saved as drawn, outputs on the CPU."""
    import transformers
    with open(os.path.join(checkpoint, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(checkpoint, cfg["mm_vision_tower"], "config.json")) as f:
        vcfg = json.load(f)
    image_size = vcfg["image_size"]
    has_llm = cfg["num_hidden_layers"] > 0

    tdtype = DTYPES[dtype]
    ref = (ReleaseModel(checkpoint, arcana_src, release_sliced_mask, tdtype, device) if arcana_src
           else RefModel(checkpoint, tdtype, device))
    model = ref.model
    tensors = {}
    meta = {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "preset": preset or "",
        "seed": str(seed),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "implementation": ("release:" + os.path.abspath(arcana_src)
                           + (" (visual mask sliced)" if release_sliced_mask else "")) if arcana_src
        else "parity/arcana_ref",
        "visual_tokens_per_image": str((image_size // vcfg["patch_size"]) ** 2 + 64),
        **provenance.machine(),
    }
    if device != "cpu" or dtype != "fp32":
        # only off the default, so the committed CPU fp32 fixtures keep their metadata
        meta["device"] = device + (f" ({torch.cuda.get_device_name(torch.device(device))})"
                                   if device.startswith("cuda") else "")
        meta["dtype"] = dtype

    if has_llm:
        if input_ids is not None:
            ids, mask = parse_input_ids(input_ids)
            meta["case"] = "custom"
        else:
            case = case or "image-long"
            ids, mask = case_input_ids(case, cfg["vocab_size"], seed)
            meta["case"] = case
        n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
    else:
        ids, mask, n_images = None, None, batch

    torch.manual_seed(seed)
    # float64 draw rounded to float32: the same pixels on every CPU kernel path (see _init_tensor)
    pixel_values = torch.randn(n_images, 3, image_size, image_size, dtype=torch.float64).float() \
        if n_images > 0 else None

    # what the model is fed: on its device, pixels in its dtype (the saved inputs stay as drawn)
    pixels_in = pixel_values.to(device=device, dtype=tdtype) if pixel_values is not None else None
    ids_in = ids.to(device) if ids is not None else None
    mask_in = mask.to(device) if mask is not None else None

    with torch.no_grad():
        if pixel_values is not None:
            tensors["input.pixel_values"] = pixel_values
            vout, features = ref.vision(pixels_in)
            for i, h in enumerate(vout.hidden_states):
                tensors[f"vision.hidden_states.{i}"] = h
            for i, q in enumerate(vout.ladder_hidden_states):
                tensors[f"qladder.{i}"] = q
            tensors["vision.features"] = features
            tensors["projector.out"] = model.get_model().mm_projector(features) if arcana_src \
                else model.model.mm_projector(features)

        if has_llm:
            tensors["input.input_ids"] = ids
            if mask is not None:
                tensors["input.attention_mask"] = mask
            if pixel_values is not None:
                _, _, splice_mask, _, embeds, _ = ref.splice(ids_in, mask_in, pixels_in)
                if splice_mask is not None:
                    tensors["splice.attention_mask"] = splice_mask
            else:
                embeds = model.model.embed_tokens(ids_in)
            tensors["inputs_embeds"] = embeds
            prefill_len = embeds.shape[1]
            meta["prefill_len"] = str(prefill_len)
            meta["mask_policy"] = ("release" if prefill_len >= 675 or prefill_len == 1 else
                                   "sliced (the release raises for 1 < length < 675)")

            captured = {}
            hooks = []
            for i, layer in enumerate(model.model.layers):
                hooks.append(layer.register_forward_hook(
                    lambda m, a, o, i=i: captured.__setitem__(f"llm.layers.{i}", o[0])))
            hooks.append(model.model.norm.register_forward_hook(
                lambda m, a, o: captured.__setitem__("llm.norm", o)))
            try:
                logits = model(input_ids=ids_in, attention_mask=mask_in, images=pixels_in, use_cache=False,
                               return_dict=True).logits
            finally:
                for h in hooks:
                    h.remove()
            tensors.update(captured)
            tensors["logits"] = logits.float()

            greedy = model.generate(ids_in, images=pixels_in, attention_mask=mask_in, do_sample=False,
                                    num_beams=1, max_new_tokens=new_tokens, use_cache=True)
            tensors["greedy.ids"] = greedy
            meta["new_tokens"] = str(new_tokens)

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata=meta)
    return tensors, meta


# --------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------
def _reference_name(case, default_case):
    return "reference.safetensors" if case == default_case else f"reference.{case}.safetensors"


def write_fixtures(root: str, presets, repo_root_for_commands: str):
    for name in presets:
        preset = PRESETS[name]
        pdir = os.path.join(root, name)
        if os.path.exists(pdir):
            shutil.rmtree(pdir)
        ckpt = pdir  # the checkpoint files and the reference files share the preset's folder
        seed = preset.get("fixture_seed", FIXTURE_SEED)
        make_checkpoint(name, seed, ckpt)
        rel_ckpt = os.path.join(repo_root_for_commands, name)
        cases = preset.get("cases", [None])
        for case in cases:
            fname = _reference_name(case, cases[0])
            cmd = (f"python parity/export.py reference --checkpoint {rel_ckpt} "
                   f"--out {os.path.join(repo_root_for_commands, name, fname)} --seed {seed}")
            if case is None:
                cmd += f" --batch {preset['batch']}"
            else:
                cmd += f" --case {case} --new-tokens {FIXTURE_NEW_TOKENS}"
            run_reference(ckpt, os.path.join(pdir, fname), seed=seed, batch=preset.get("batch", 1),
                          case=case, new_tokens=FIXTURE_NEW_TOKENS, command=cmd, preset=name)
        print(f"{name}: {_dir_size(pdir)} bytes")


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else (
        t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int64) if t.element_size() == 8 else t)


# Float stages in forward order; a tensor's stage is its name without a trailing layer index.
STAGE_PREFIXES = ["vision.hidden_states", "qladder", "vision.features", "projector.out", "inputs_embeds",
                  "llm.layers", "llm.norm", "logits"]


def tolerance_stage(name: str) -> str:
    head, _, tail = name.rpartition(".")
    return head if head and tail.isdigit() else name


def load_tolerances(path=TOLERANCES):
    with open(path) as f:
        return json.load(f)["stages"]


def write_tolerances(measured: dict, margin: float, machine: dict, command: str, path=TOLERANCES):
    """Per-stage bounds for comparing committed fixtures made on another machine: the measured drift
    between kernel paths times `margin` for max rel, and times `margin`**2 for 1 - cosine (which grows
    with the square of a small relative error)."""
    stages = {}
    for stage in STAGE_PREFIXES:
        m = measured.get(stage)
        if m is None:
            continue
        stages[stage] = {
            "max_rel": m["max_rel"] * margin,
            "min_cosine": 1.0 - (1.0 - m["min_cosine"]) * margin ** 2,
            "measured_max_rel": m["max_rel"],
            "measured_min_cosine": m["min_cosine"],
            "measured_max_abs": m["max_abs"],
        }
    doc = {
        "about": "Bounds for committed parity fixtures compared on another machine or kernel path: a float "
                 "tensor passes when max|diff| / max|reference| <= max_rel and cosine >= min_cosine. "
                 "Integer tensors (inputs, masks, greedy ids) must be equal. Same-machine comparisons "
                 "demand bit-identity instead.",
        "command": command,
        "margin": margin,
        "measured_on": machine,
        "stages": stages,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else (
        t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int64) if t.element_size() == 8 else t)


def _drift(ta: torch.Tensor, tb: torch.Tensor):
    a, b = ta.double(), tb.double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    ref_max = b.abs().max().item() if b.numel() else 0.0
    rel = diff / ref_max if ref_max > 0 else (0.0 if diff == 0 else float("inf"))
    norms = a.norm().item() * b.norm().item()
    cos = (a * b).sum().item() / norms if norms > 0 else 1.0
    return diff, rel, cos


def _is_machine_meta(key: str) -> bool:
    return key.startswith("machine.")


def compare_safetensors(a: str, b: str, ignore_meta=("command",), tolerances=None):
    """Differences between two safetensors files: names, dtypes, shapes, bits, metadata. With `tolerances`
    (stage -> bounds), float tensors of a listed stage may differ within the bounds; `b` is the reference."""
    problems = []
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        ma, mb = fa.metadata() or {}, fb.metadata() or {}
        for k in sorted(set(ma) | set(mb)):
            if k not in ignore_meta and not _is_machine_meta(k) and ma.get(k) != mb.get(k):
                problems.append(f"metadata {k}: {ma.get(k)!r} != {mb.get(k)!r}")
        ka, kb = set(fa.keys()), set(fb.keys())
        for k in sorted(ka ^ kb):
            problems.append(f"tensor {k} only in {'first' if k in ka else 'second'}")
        for k in sorted(ka & kb):
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            if ta.dtype != tb.dtype or ta.shape != tb.shape:
                problems.append(f"{k}: {ta.dtype}{list(ta.shape)} != {tb.dtype}{list(tb.shape)}")
                continue
            if torch.equal(_bits(ta), _bits(tb)):
                continue
            diff, rel, cos = _drift(ta, tb)
            bound = (tolerances or {}).get(tolerance_stage(k)) if ta.is_floating_point() else None
            if bound is None:
                problems.append(f"{k}: values differ (max abs diff {diff:.3e})")
            elif rel > bound["max_rel"] or cos < bound["min_cosine"]:
                problems.append(f"{k}: over tolerance: max rel {rel:.3e} (bound {bound['max_rel']:.3e}), "
                                f"cosine {cos:.12f} (bound {bound['min_cosine']:.12f})")
    return problems


def compare_trees(committed: str, fresh: str, tolerances=None):
    problems = []
    files_a = {os.path.relpath(os.path.join(d, f), committed) for d, _, fs in os.walk(committed) for f in fs}
    files_b = {os.path.relpath(os.path.join(d, f), fresh) for d, _, fs in os.walk(fresh) for f in fs}
    for f in sorted(files_a ^ files_b):
        problems.append(f"{f}: only in {'committed' if f in files_a else 'fresh'} fixtures")
    for f in sorted(files_a & files_b):
        pa, pb = os.path.join(committed, f), os.path.join(fresh, f)
        if f.endswith(".safetensors"):
            # Reference files may move within the kernel-path tolerances; checkpoints stay bit for bit.
            bounds = tolerances if os.path.basename(f).startswith("reference") else None
            problems += [f"{f}: {p}" for p in compare_safetensors(pb, pa, tolerances=bounds)]
        elif not filecmp.cmp(pa, pb, shallow=False):
            problems.append(f"{f}: contents differ")
    return problems


# --------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    mc = sub.add_parser("make-checkpoint", help="write a seeded tiny random checkpoint")
    mc.add_argument("--preset", required=True, choices=sorted(PRESETS))
    mc.add_argument("--seed", type=int, default=0)
    mc.add_argument("--out", required=True)
    mc.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the preset's")
    mc.add_argument("--vision-in-main", dest="vision_in_main", action="store_true", default=None)
    mc.add_argument("--no-vision-in-main", dest="vision_in_main", action="store_false")
    mc.add_argument("--shards", type=int, default=None, help="default: the preset's")
    mc.add_argument("--tokenizer-model", default=None,
                    help="presets with a tokenizer (cli-tiny): the SentencePiece model to copy; default the "
                         "Mistral 7B v0.1 one that scripts/setup-python.sh fetches")

    rf = sub.add_parser("reference", help="run the fp32 CPU reference and save named tensors")
    rf.add_argument("--checkpoint", required=True)
    rf.add_argument("--out", required=True)
    rf.add_argument("--seed", type=int, default=0)
    rf.add_argument("--batch", type=int, default=1, help="images for a vision-only checkpoint")
    rf.add_argument("--input-ids", default=None,
                    help="rows separated by ';', ids by ',' or spaces; -200 marks an image")
    rf.add_argument("--case", default=None,
                    help="image-long (default), image-at-35, text, image-at-5, two-images, batch2")
    rf.add_argument("--new-tokens", type=int, default=16)
    rf.add_argument("--arcana-src", default=None, help="import the release's own modules from this checkout")
    rf.add_argument("--release-sliced-mask", action="store_true",
                    help="with --arcana-src: give the release's SLoRA the visual mask sliced to the sequence "
                         "length, so prefills shorter than 675 positions run instead of raising")
    rf.add_argument("--preset", default=None, help="recorded in the metadata")
    rf.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the reference runs")
    rf.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="the dtype the reference runs in (weights cast from the checkpoint's)")

    fx = sub.add_parser("fixtures", help="(re)create or --check tests/fixtures/parity/<preset>/")
    fx.add_argument("--root", default=DEFAULT_FIXTURES)
    fx.add_argument("--preset", action="append", choices=sorted(FIXTURE_PRESETS), help="default: all")
    fx.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    fx.add_argument("--exact", action="store_true",
                    help="with --check: demand bit-identical references (only meaningful on the machine and "
                         "kernel path that made them)")
    fx.add_argument("--tolerances", default=TOLERANCES, help="with --check: per-stage bounds (JSON)")

    cmp_ = sub.add_parser("compare", help="compare two reference files tensor by tensor, bit for bit")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    cmp_.add_argument("--ignore-meta", default="command,implementation,preset")

    args = p.parse_args(argv)
    if args.cmd == "make-checkpoint":
        make_checkpoint(args.preset, args.seed, args.out, args.dtype, args.vision_in_main, args.shards,
                        args.tokenizer_model)
    elif args.cmd == "reference":
        run_reference(args.checkpoint, args.out, seed=args.seed, batch=args.batch, input_ids=args.input_ids,
                      case=args.case, new_tokens=args.new_tokens, arcana_src=args.arcana_src, preset=args.preset,
                      release_sliced_mask=args.release_sliced_mask, device=args.device, dtype=args.dtype)
    elif args.cmd == "fixtures":
        presets = args.preset or FIXTURE_PRESETS
        rel_root = os.path.relpath(os.path.abspath(args.root), REPO)
        if not args.check:
            write_fixtures(args.root, presets, rel_root)
            return 0
        tolerances = None if args.exact else load_tolerances(args.tolerances)
        with tempfile.TemporaryDirectory() as tmp:
            write_fixtures(tmp, presets, rel_root)
            problems = []
            for name in presets:
                problems += [f"{name}/{x}" for x in
                             compare_trees(os.path.join(args.root, name), os.path.join(tmp, name), tolerances)]
        with safe_open(os.path.join(args.root, presets[0], "reference.safetensors"), "pt") as f:
            made_on = {k: v for k, v in (f.metadata() or {}).items() if _is_machine_meta(k)}
        here = provenance.machine()
        print("committed fixtures made on: " + (", ".join(f"{k[8:]}={v}" for k, v in sorted(made_on.items())) or "unrecorded"))
        print("fresh export on:            " + ", ".join(f"{k[8:]}={v}" for k, v in sorted(here.items())))
        rule = "bit for bit" if args.exact else f"within {os.path.relpath(args.tolerances, REPO)}"
        if problems:
            print(f"fixtures differ from a fresh export ({rule}):")
            for x in problems:
                print("  " + x)
            return 1
        print(f"fixtures match a fresh export ({rule}; checkpoints and integer tensors bit for bit): "
              f"{', '.join(presets)}")
    elif args.cmd == "compare":
        problems = compare_safetensors(args.a, args.b, ignore_meta=tuple(args.ignore_meta.split(",")))
        for x in problems:
            print(x)
        print("identical" if not problems else f"{len(problems)} differences")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
