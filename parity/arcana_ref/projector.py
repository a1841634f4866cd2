"""Multimodal projector: `linear` (a bare nn.Linear: names `weight`/`bias`), `mlpNx_gelu`
(nn.Sequential Linear, [GELU, Linear] * (N-1): names `0.*`, `2.*`, ...) or `identity`."""
import re

import torch.nn as nn


class Identity(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    m = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if m:
        layers = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(1, int(m.group(1))):
            layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_size, hidden_size))
        return nn.Sequential(*layers)
    if projector_type == "identity":
        return Identity()
    raise ValueError(f"unknown mm_projector_type: {projector_type}")
