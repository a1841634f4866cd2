"""CLIP vision tower with the Query Ladder adapter (inference only).

The CLIP trunk is transformers' own `CLIPVisionModel`.  Next to it sit one ladder layer per CLIP layer
(`LadderAdapters.N`) and 64 learned queries (`qladder_embeds`, [1, 64, H]).  Ladder layer i reads the
input of CLIP layer i (`hidden_states[i]`) as keys/values.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.utils import ModelOutput

NUM_LADDER_QUERIES = 64  # fixed by the release


class LadderCrossAttention(nn.Module):
    """Multi-head attention with queries from one sequence and keys/values from another.

    Computed exactly like transformers' CLIP attention: scaled q after its bias, bmm over
    (batch * heads), softmax in the input dtype, bmm with v, output projection.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        self.scale = self.head_dim ** -0.5
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _heads(self, t: torch.Tensor, seq_len: int, bsz: int) -> torch.Tensor:
        return t.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        bsz, q_len, embed_dim = queries.size()
        q = self.q_proj(queries) * self.scale
        k = self._heads(self.k_proj(context), -1, bsz)
        v = self._heads(self.v_proj(context), -1, bsz)
        flat = (bsz * self.num_heads, -1, self.head_dim)
        q = self._heads(q, q_len, bsz).view(*flat)
        k = k.view(*flat)
        v = v.view(*flat)
        weights = torch.bmm(q, k.transpose(1, 2))
        weights = nn.functional.softmax(weights, dim=-1)
        out = torch.bmm(weights, v)
        out = out.view(bsz, self.num_heads, q_len, self.head_dim)
        out = out.transpose(1, 2)
        out = out.reshape(bsz, q_len, embed_dim)
        return self.out_proj(out)


class LadderLayer(nn.Module):
    """q = q + cross_attn(ln0(q), ln1(clip_hidden)); q = q + mlp(ln2(q))."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.layer_norm0 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.cross_attn = LadderCrossAttention(config)
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, queries: torch.Tensor, clip_hidden: torch.Tensor) -> torch.Tensor:
        residual = queries
        q = self.layer_norm0(queries)
        kv = self.layer_norm1(clip_hidden)
        h = self.cross_attn(q, kv)
        h = residual + h
        residual = h
        h = self.layer_norm2(h)
        h = self.mlp(h)
        return residual + h


@dataclass
class LadderVisionOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor = None
    pooler_output: torch.FloatTensor = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    ladder_hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


class CLIPWithQueryLadder(CLIPVisionModel):
    """transformers `CLIPVisionModel` + `LadderAdapters` + `qladder_embeds` (state-dict names as the release)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.LadderAdapters = nn.ModuleList([LadderLayer(config) for _ in range(config.num_hidden_layers)])
        self.qladder_embeds = nn.Parameter(torch.zeros((1, NUM_LADDER_QUERIES, config.hidden_size)))
        self.post_init()

    def forward(self, pixel_values, return_dict=True, output_attentions=False, output_hidden_states=True):
        clip_out = super().forward(
            pixel_values,
            return_dict=return_dict,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        ladder = ()
        queries = None
        for idx, layer in enumerate(self.LadderAdapters):
            if idx == 0:
                queries = self.qladder_embeds.repeat(clip_out.hidden_states[idx].shape[0], 1, 1)
            queries = layer(queries, clip_out.hidden_states[idx])
            ladder = ladder + (queries,)
        return LadderVisionOutput(
            last_hidden_state=clip_out.last_hidden_state,
            pooler_output=clip_out.pooler_output,
            hidden_states=clip_out.hidden_states,
            ladder_hidden_states=ladder,
        )


class VisionTower(nn.Module):
    """Holds the ladder CLIP as `.vision_tower` (so main-checkpoint names are
    `model.vision_tower.vision_tower.*`) and selects the features the projector reads."""

    def __init__(self, config: CLIPVisionConfig, select_layer: int, select_feature: str = "patch"):
        super().__init__()
        self.vision_tower = CLIPWithQueryLadder(config)
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device

    def run_tower(self, images: torch.Tensor) -> LadderVisionOutput:
        return self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)

    def select(self, out: LadderVisionOutput) -> torch.Tensor:
        ladder = out.ladder_hidden_states[self.select_layer]
        clip = out.hidden_states[self.select_layer]
        if self.select_feature != "patch":
            raise ValueError(f"unsupported mm_vision_select_feature: {self.select_feature}")
        clip = clip[:, 1:]
        return torch.cat([clip, ladder], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.select(self.run_tower(images)).to(images.dtype)
