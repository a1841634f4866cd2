#!/usr/bin/env bash
# The main job on the bundled default: builds, makes the tiny demo checkpoint if missing, exports the
# PyTorch reference for it and prints the Rust model's parity table against it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-python.sh
source scripts/env.sh
preset="${ARCANA_DEMO_PRESET:-vision-d4-sel-2}"
seed="${ARCANA_DEMO_SEED:-1234}"
out="demo/$preset-seed$seed"
cargo build --quiet -p arcana-parity
if [ ! -f "$out/checkpoint/config.json" ]; then
  echo "demo: making checkpoint $out/checkpoint (preset $preset, seed $seed)"
  tmp="$out.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  python parity/export.py make-checkpoint --preset "$preset" --seed "$seed" --out "$tmp/checkpoint"
  rm -rf "$out" && mv "$tmp" "$out"
fi
python parity/export.py reference --checkpoint "$out/checkpoint" --seed "$seed" --batch 2 --out "$out/reference.safetensors"
target/debug/arcana-parity --checkpoint "$out/checkpoint" --reference "$out/reference.safetensors"
