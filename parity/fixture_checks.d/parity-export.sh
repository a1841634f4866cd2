#!/usr/bin/env bash
# The committed parity fixtures (tests/fixtures/parity/<preset>/) still equal a fresh PyTorch export:
# checkpoints, inputs and greedy ids bit for bit, float references within the per-stage bounds of
# tests/fixtures/parity/tolerances.json (they were made on another machine). Then shows the check can
# fail: a copy with one `llm.layers.1` element moved by 10x its bound must be refused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONWARNINGS=ignore
python parity/export.py fixtures --check
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r tests/fixtures/parity/lm-mha "$tmp/"
python - "$tmp/lm-mha/reference.safetensors" <<'PY'
import json, sys
from safetensors import safe_open
from safetensors.torch import save_file
path = sys.argv[1]
bound = json.load(open("tests/fixtures/parity/tolerances.json"))["stages"]["llm.layers"]["max_rel"]
with safe_open(path, "pt") as f:
    meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
t = tensors["llm.layers.1"]
t.view(-1)[0] += 10 * bound * t.abs().max()
save_file(tensors, path, metadata=meta)
PY
if out="$(python parity/export.py fixtures --check --root "$tmp" --preset lm-mha 2>&1)"; then
  echo "$out"
  echo "FAIL: a fixture moved by 10x its tolerance passed the check" >&2
  exit 1
fi
grep -q "reference.safetensors: llm.layers.1: over tolerance" <<<"$out" || { echo "$out"; echo "FAIL: wrong reason" >&2; exit 1; }
echo "a fixture moved by 10x its tolerance is refused: ok"
