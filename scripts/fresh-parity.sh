#!/usr/bin/env bash
# Makes each parity preset's checkpoint with a new seed, exports the PyTorch reference and runs the Rust
# comparer on it, so parity is never tied to the committed fixtures. ARCANA_PARITY_SEED fixes the seed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
seed="${ARCANA_PARITY_SEED:-$(( $(date +%s) % 100000 ))}"
presets="${ARCANA_PARITY_PRESETS:-vision-d4-sel-2 vision-d3-sel-1 vision-linear}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo build --quiet -p arcana-parity
echo "fresh parity: seed $seed"
for preset in $presets; do
  python parity/export.py make-checkpoint --preset "$preset" --seed "$seed" --out "$work/$preset"
  python parity/export.py reference --checkpoint "$work/$preset" --seed "$seed" --batch 2 --out "$work/$preset.reference.safetensors"
  echo "-- $preset (seed $seed)"
  target/debug/arcana-parity --checkpoint "$work/$preset" --reference "$work/$preset.reference.safetensors"
done
