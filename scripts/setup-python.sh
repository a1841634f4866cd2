#!/usr/bin/env bash
# Creates (or reuses) the Python environment of the PyTorch reference side, outside the repository.
# The same environment provides the libtorch that the Rust crates link against (tch 0.13.0 on torch 2.0.1).
# Idempotent: a stamp file records the pinned requirement set; a matching stamp means nothing to do.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${ARCANA_VENV:-$HOME/.cache/arcana/venv-torch-2.0.1}"
req="$here/../parity/requirements.txt"
stamp="$venv/.arcana-requirements"
python="${PYTHON:-python3}"

if [ -f "$stamp" ] && cmp -s "$stamp" "$req" && "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: reusing Python environment $venv" >&2
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating Python environment $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
echo "setup: installing the reference stack from $req into $venv (torch 2.0.1 is a large download the first time)" >&2
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$req"
cp "$req" "$stamp"
echo "setup: done" >&2
