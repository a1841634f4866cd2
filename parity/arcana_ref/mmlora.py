"""The release's two-branch LoRA linear layer ("MM-LoRA") at inference.

    res = x W^T (+ b)
    res[visual]   += V_B(V_A(x[visual])) * 2        (rank 64)
    res[~visual]  += L_B(L_A(x[~visual])) * 2       (rank 192)

The release never passes a mask at inference, so the layer builds one from the input's shape:
- a forward over more than one position marks positions [35, 35 + 576 + 64) as visual;
- a one-position forward (each decode step with the KV cache) is all language.
When a branch selects no position, the release still runs it on position 0 and adds the result times 0
(`res[:, :1] += branch(x[:, :1]) * 0`); that is reproduced too (it turns -0.0 into +0.0 and spreads NaN/inf).

Sequence lengths: the release fills the visual span by assigning a [B, 640] block of ones to
`mask[:, 35:675]`, which raises for any multi-position forward shorter than 675 positions.  This module
fills the span sliced to the sequence length instead (mask identical to the release's whenever the release
runs); set `STRICT_RELEASE_MASK = True` to raise exactly where the release raises.
"""
import torch
import torch.nn as nn

VISUAL_START = 35
VISUAL_LEN = 576 + 64
RANK_VISUAL = 64
RANK_LANGUAGE = 192
SCALING_VISUAL = 2
SCALING_LANGUAGE = 2

STRICT_RELEASE_MASK = False


def release_visual_mask(x: torch.Tensor) -> torch.Tensor:
    bsz, seq = x.shape[0], x.shape[1]
    if seq == 1:
        return torch.zeros([bsz, 1], dtype=torch.bool, device=x.device)
    mask = torch.zeros([bsz, seq], dtype=torch.bool, device=x.device)
    if STRICT_RELEASE_MASK:
        mask[:, VISUAL_START:VISUAL_START + VISUAL_LEN] = torch.ones([bsz, VISUAL_LEN], dtype=torch.bool, device=x.device)
    else:
        mask[:, VISUAL_START:VISUAL_START + VISUAL_LEN] = True
    return mask


class MMLoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.V_Slora_A = nn.Linear(in_features, RANK_VISUAL, bias=False)
        self.V_Slora_B = nn.Linear(RANK_VISUAL, out_features, bias=False)
        self.L_Slora_A = nn.Linear(in_features, RANK_LANGUAGE, bias=False)
        self.L_Slora_B = nn.Linear(RANK_LANGUAGE, out_features, bias=False)

    @staticmethod
    def _add_branch(res, x, mask, a, b, scaling):
        if torch.sum(mask) > 0:
            part = x[mask]
            res[mask] += b(a(part)) * scaling
        else:
            part = x[:, :1]
            res[:, :1] += b(a(part)) * 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = super().forward(x)
        visual = release_visual_mask(x)
        self._add_branch(res, x, visual, self.V_Slora_A, self.V_Slora_B, SCALING_VISUAL)
        self._add_branch(res, x, ~visual, self.L_Slora_A, self.L_Slora_B, SCALING_LANGUAGE)
        return res


def install_mmlora(llama_model: nn.Module) -> None:
    """Replace every q/k/v/o/gate/up/down projection of a transformers LlamaModel by an MMLoRALinear."""
    for layer in llama_model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                old = getattr(parent, name)
                setattr(parent, name, MMLoRALinear(old.in_features, old.out_features, bias=old.bias is not None))
