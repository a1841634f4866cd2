"""Arcana at inference: transformers' LlamaForCausalLM (eager attention) with MM-LoRA projections, the
Query-Ladder vision tower, the projector, and the splice of image features into the text embeddings.

Module names equal the release's checkpoint names (`model.layers.N.self_attn.q_proj.V_Slora_A.weight`,
`model.mm_projector.0.weight`, `model.vision_tower.vision_tower.LadderAdapters.N.*`, ...).
"""
import json
import os
from typing import List, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import no_init_weights

from .mmlora import install_mmlora
from .projector import build_projector
from .vision import VisionTower

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
VISION_PREFIX = "model.vision_tower.vision_tower."


class ArcanaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: LlamaConfig, vision_config: Optional[CLIPVisionConfig] = None):
        config._attn_implementation = "eager"
        super().__init__(config)
        install_mmlora(self.model)
        if vision_config is not None:
            self.model.vision_tower = VisionTower(
                vision_config,
                select_layer=config.mm_vision_select_layer,
                select_feature=getattr(config, "mm_vision_select_feature", "patch"),
            )
            self.model.mm_projector = build_projector(
                getattr(config, "mm_projector_type", "linear"), config.mm_hidden_size, config.hidden_size
            )

    # ---- vision -------------------------------------------------------------------------------------
    def get_vision_tower(self):
        return getattr(self.model, "vision_tower", None)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.vision_tower(images)
        return self.model.mm_projector(features)

    # ---- splice -------------------------------------------------------------------------------------
    def splice(self, input_ids, position_ids, attention_mask, past_key_values, labels, images):
        """Replace each IMAGE_TOKEN_INDEX by that image's projected features; right-pad the batch.

        Returns (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) with the
        conventions of the release: position_ids / attention_mask come back None when given as None.
        """
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if isinstance(images, list) or images.ndim == 5:
            raise NotImplementedError("only a [N, 3, H, W] image batch is supported")
        image_features = self.encode_images(images)

        given_labels, given_positions, given_mask = labels, position_ids, attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            attention_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(0, input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)

        rows = [ids[m] for ids, m in zip(input_ids, attention_mask)]
        row_labels = [lab[m] for lab, m in zip(labels, attention_mask)]
        embed = self.model.embed_tokens

        new_embeds: List[torch.Tensor] = []
        new_labels: List[torch.Tensor] = []
        image_idx = 0
        for b, ids in enumerate(rows):
            n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
            if n_images == 0:
                # a row without an image still consumes one image slot (release behaviour)
                feats = image_features[image_idx]
                new_embeds.append(torch.cat([embed(ids), feats[0:0]], dim=0))
                new_labels.append(row_labels[b])
                image_idx += 1
                continue
            cuts = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [ids.shape[0]]
            text_chunks, label_chunks = [], []
            for i in range(len(cuts) - 1):
                text_chunks.append(ids[cuts[i] + 1:cuts[i + 1]])
                label_chunks.append(row_labels[b][cuts[i] + 1:cuts[i + 1]])
            sizes = [c.shape[0] for c in label_chunks]
            text_embeds = torch.split(embed(torch.cat(text_chunks)), sizes, dim=0)
            parts, part_labels = [], []
            for i in range(n_images + 1):
                parts.append(text_embeds[i])
                part_labels.append(label_chunks[i])
                if i < n_images:
                    feats = image_features[image_idx]
                    image_idx += 1
                    parts.append(feats)
                    part_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX, dtype=label_chunks[i].dtype,
                                                  device=label_chunks[i].device))
            new_embeds.append(torch.cat(parts))
            new_labels.append(torch.cat(part_labels))

        max_tokens = getattr(self.config, "tokenizer_model_max_length", None)
        if max_tokens is not None:
            new_embeds = [e[:max_tokens] for e in new_embeds]
            new_labels = [lab[:max_tokens] for lab in new_labels]

        max_len = max(e.shape[0] for e in new_embeds)
        bsz = len(new_embeds)
        padded = []
        # on the inputs' device, as the release builds them
        labels_padded = torch.full((bsz, max_len), IGNORE_INDEX, dtype=new_labels[0].dtype, device=new_labels[0].device)
        out_mask = torch.zeros((bsz, max_len), dtype=attention_mask.dtype, device=attention_mask.device)
        out_positions = torch.zeros((bsz, max_len), dtype=position_ids.dtype, device=position_ids.device)
        left = getattr(self.config, "tokenizer_padding_side", "right") == "left"
        for i, (e, lab) in enumerate(zip(new_embeds, new_labels)):
            n = e.shape[0]
            pad = torch.zeros((max_len - n, e.shape[1]), dtype=e.dtype, device=e.device)
            if left:
                padded.append(torch.cat((pad, e), dim=0))
                if n > 0:
                    labels_padded[i, -n:] = lab
                    out_mask[i, -n:] = True
                    out_positions[i, -n:] = torch.arange(0, n, dtype=out_positions.dtype, device=out_positions.device)
            else:
                padded.append(torch.cat((e, pad), dim=0))
                if n > 0:
                    labels_padded[i, :n] = lab
                    out_mask[i, :n] = True
                    out_positions[i, :n] = torch.arange(0, n, dtype=out_positions.dtype, device=out_positions.device)
        inputs_embeds = torch.stack(padded, dim=0)

        out_labels = None if given_labels is None else labels_padded
        out_mask = None if given_mask is None else out_mask.to(dtype=given_mask.dtype)
        out_positions = None if given_positions is None else out_positions
        return None, out_positions, out_mask, past_key_values, inputs_embeds, out_labels

    # ---- forward / generate -------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, images=None, image_sizes=None, return_dict=None):
        if inputs_embeds is None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = self.splice(
                input_ids, position_ids, attention_mask, past_key_values, labels, images)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict)

    @torch.no_grad()
    def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
        """As the release: splice (or embed) first, then transformers' generate with inputs_embeds only."""
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")
        if images is not None:
            (inputs, position_ids, attention_mask, _, inputs_embeds, _) = self.splice(
                inputs, position_ids, attention_mask, None, None, images)
        else:
            inputs_embeds = self.model.embed_tokens(inputs)
        return super().generate(position_ids=position_ids, attention_mask=attention_mask,
                                inputs_embeds=inputs_embeds, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        images = kwargs.pop("images", None)
        kwargs.pop("image_sizes", None)
        out = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)
        if images is not None:
            out["images"] = images
        return out


# ---- checkpoint loading -------------------------------------------------------------------------------
def safetensors_files(path: str, stem: str = "model") -> List[str]:
    """`<stem>.safetensors`, or the shards named in `<stem>.safetensors.index.json`."""
    single = os.path.join(path, f"{stem}.safetensors")
    index = os.path.join(path, f"{stem}.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no {stem}.safetensors or index in {path}")


def read_safetensors_dir(path: str, stem: str = "model") -> dict:
    """All tensors of `<stem>.safetensors` or of the shards named in `<stem>.safetensors.index.json`."""
    tensors = {}
    for file in safetensors_files(path, stem):
        tensors.update(load_file(file))
    return tensors


def vision_tower_dir(checkpoint: str, config: dict) -> str:
    name = config["mm_vision_tower"]
    return name if os.path.isabs(name) else os.path.join(checkpoint, name)


def load_arcana(checkpoint: str, dtype=torch.float32) -> ArcanaForCausalLM:
    """Build the model and load the weights the release's way: the vision-tower folder's weights first,
    then every tensor of the main checkpoint (its `model.vision_tower.vision_tower.*` override them)."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        raw = json.load(f)
    config = LlamaConfig.from_dict(raw)
    vision_config = None
    vdir = None
    if "mm_vision_tower" in raw:
        vdir = vision_tower_dir(checkpoint, raw)
        vision_config = CLIPVisionConfig.from_pretrained(vdir)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # every parameter is overwritten below: skip the random init (minutes at 7B width)
        with no_init_weights():
            model = ArcanaForCausalLM(config, vision_config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)

    # One file at a time, so that memory peaks at the model plus one file, not twice the model.
    expected = set(model.state_dict())
    loaded = set()

    def load(tensors):
        unexpected = set(tensors) - expected
        if unexpected:
            raise ValueError(f"unexpected tensors in checkpoint: {sorted(unexpected)[:8]}")
        model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
        loaded.update(tensors)

    if vdir is not None:
        for file in safetensors_files(vdir):
            load({VISION_PREFIX + k: v for k, v in load_file(file).items()})
    for file in safetensors_files(checkpoint):  # after the folder's: its vision tensors override
        load(load_file(file))
    missing = expected - loaded
    if missing:
        raise ValueError(f"tensors missing from checkpoint: {sorted(missing)[:8]}")
    gen = os.path.join(checkpoint, "generation_config.json")
    if os.path.exists(gen):
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    model.eval()
    return model
