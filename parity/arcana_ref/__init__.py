"""PyTorch reference for the release-specific parts of Arcana, built on transformers 4.37.2.

Modules:
- vision:    CLIP vision model with the Query Ladder adapter and the feature selection.
- projector: the multimodal projector (linear / mlpNx_gelu / identity).
- mmlora:    the two-branch LoRA linear layer (visual rank 64, language rank 192).
- llava:     the Llama language model with MM-LoRA, the image splice and the checkpoint loader.

Every forward uses the same torch operations, in the same order, as the release at inference, so that
fp32 CPU results are bit-identical to it.
"""
