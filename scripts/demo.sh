#!/usr/bin/env bash
# The main job on the bundled default: builds, makes the tiny demo checkpoints if missing, exports the
# PyTorch reference and prints the Rust model's parity table against it, then asks the `arcana` CLI about
# an example image with the tiny chat checkpoint (random weights: the answer is noise, the path is real).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-python.sh
source scripts/env.sh
preset="${ARCANA_DEMO_PRESET:-vision-d4-sel-2}"
seed="${ARCANA_DEMO_SEED:-1234}"
out="demo/$preset-seed$seed"
cargo build --quiet -p arcana-parity -p arcana --bin arcana-parity --bin arcana
if [ ! -f "$out/checkpoint/config.json" ]; then
  echo "demo: making checkpoint $out/checkpoint (preset $preset, seed $seed)"
  tmp="$out.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  python parity/export.py make-checkpoint --preset "$preset" --seed "$seed" --out "$tmp/checkpoint"
  rm -rf "$out" && mv "$tmp" "$out"
fi
python parity/export.py reference --checkpoint "$out/checkpoint" --seed "$seed" --batch 2 --out "$out/reference.safetensors"
target/debug/arcana-parity --checkpoint "$out/checkpoint" --reference "$out/reference.safetensors"

cli="demo/cli"
if [ ! -f "$cli/cases.json" ]; then
  echo "demo: making the tiny chat checkpoint and example images in $cli"
  rm -rf "$cli.tmp"
  python parity/cli_fixtures.py --out "$cli.tmp" --no-llama2 > /dev/null 2>&1
  rm -rf "$cli" && mv "$cli.tmp" "$cli"
fi
echo
echo "demo: target/debug/arcana --model-path $cli/arcana-cli-tiny-v1 --image-file $cli/images/wide.png --prompt 'What is in this image?' --temperature 0 --max-new-tokens 24"
target/debug/arcana --model-path "$cli/arcana-cli-tiny-v1" --image-file "$cli/images/wide.png" \
  --prompt "What is in this image?" --temperature 0 --max-new-tokens 24 --debug
