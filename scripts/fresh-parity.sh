#!/usr/bin/env bash
# Makes each parity preset's checkpoint with a new seed, exports the PyTorch reference and runs the Rust
# comparer on it, demanding bit-identity: both sides run here, in this run, under the same kernel-path
# settings (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, thread counts are inherited by both), which is
# where bit-identity is defined. Covers every case of the committed fixtures.
# ARCANA_PARITY_SEED fixes the seed; ARCANA_PARITY_CASES lists `preset` or `preset:case` entries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
seed="${ARCANA_PARITY_SEED:-$(( $(date +%s) % 100000 ))}"
cases="${ARCANA_PARITY_CASES:-vision-d4-sel-2 vision-d3-sel-1 vision-linear lm-mha lm-mha:text lm-mha:image-at-5 lm-mha:two-images lm-mha:batch2 lm-gqa lm-gqa:text}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo build --quiet -p arcana-parity
echo "fresh parity: seed $seed"
for entry in $cases; do
  preset="${entry%%:*}"
  case_args=()
  [ "$entry" != "$preset" ] && case_args=(--case "${entry#*:}")
  if [ ! -d "$work/$preset" ]; then
    python parity/export.py make-checkpoint --preset "$preset" --seed "$seed" --out "$work/$preset" > /dev/null
  fi
  ref="$work/${entry/:/-}.reference.safetensors"
  PYTHONWARNINGS=ignore python parity/export.py reference --checkpoint "$work/$preset" --seed "$seed" --batch 2 \
    "${case_args[@]}" --out "$ref" > /dev/null
  echo "-- $entry (seed $seed)"
  target/debug/arcana-parity --checkpoint "$work/$preset" --reference "$ref"
done
