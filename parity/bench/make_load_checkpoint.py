"""Writes a checkpoint with a full-size vision tower (CLIP ViT-L/14 widths and depth, 24 ladder layers;
about 2.4 GB in fp32) in the release's layout, for the loading-memory benchmark (examples/load_memory.rs).

    python parity/bench/make_load_checkpoint.py --out /tmp/arcana-load-bench
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import export  # noqa: E402

export.PRESETS["bench-clip-l"] = dict(
    clip=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24),
    select_layer=-2, projector="mlp2x_gelu",
    llm=dict(export.VISION_ONLY_LLM, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32),
    dtype="fp32", vision_in_main=False, shards=1, batch=1)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    export.make_checkpoint("bench-clip-l", args.seed, args.out)
    print(args.out)
