#!/usr/bin/env bash
# Creates (or reuses) the Python environment of the PyTorch reference side, outside the repository.
# The same environment provides the libtorch that the Rust crates link against (tch 0.13.0 on torch 2.0.1).
# ARCANA_TORCH=2.11 makes the second one, for the libtorch 2.11 build (parity/requirements-torch-2.11.txt).
# Idempotent: a stamp file records the pinned requirement set; a matching stamp means nothing to do.
# Also provides a real SentencePiece model for tiny test checkpoints on every machine: the Mistral 7B v0.1
# tokenizer (vocabulary 32000), taken from the `mistral-common` wheel without installing that package.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
torch_version="${ARCANA_TORCH:-2.0.1}"
venv="${ARCANA_VENV:-$HOME/.cache/arcana/venv-torch-$torch_version}"
req="$here/../parity/requirements.txt"
[ "$torch_version" = 2.0.1 ] || req="$here/../parity/requirements-torch-$torch_version.txt"
serve_req="$here/../parity/serve-requirements.txt"
stamp="$venv/.arcana-requirements"
python="${PYTHON:-python3}"
tokenizers="${ARCANA_TOKENIZERS:-$HOME/.cache/arcana/tokenizers}"
mistral_model="$tokenizers/mistral-7b-v0.1-tokenizer.model"
mistral_sha256="dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

# Downloads mistral-common 1.13.1 (wheel only, no dependencies, not installed) and extracts its
# mistral_common/data/tokenizer.model.v1; skipped when the file is already there with the right hash.
fetch_mistral_tokenizer() {
  local py="$1"
  if [ -f "$mistral_model" ] && [ "$(sha256sum "$mistral_model" | cut -d' ' -f1)" = "$mistral_sha256" ]; then
    echo "setup: reusing tokenizer $mistral_model" >&2
    return 0
  fi
  echo "setup: fetching the Mistral 7B v0.1 tokenizer.model from the mistral-common 1.13.1 wheel into $tokenizers" >&2
  local tmp
  tmp="$(mktemp -d)"
  "$py" -m pip download --quiet --no-deps --disable-pip-version-check mistral-common==1.13.1 -d "$tmp" >&2
  mkdir -p "$tokenizers"
  "$py" - "$tmp" "$mistral_model.part" "$mistral_sha256" <<'PY'
import glob, hashlib, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/mistral_common-1.13.1-*.whl")[0]
data = zipfile.ZipFile(wheel).read("mistral_common/data/tokenizer.model.v1")
digest = hashlib.sha256(data).hexdigest()
if digest != sys.argv[3]:
    sys.exit(f"setup: tokenizer.model.v1 has sha256 {digest}, expected {sys.argv[3]}")
with open(sys.argv[2], "wb") as f:
    f.write(data)
PY
  mv "$mistral_model.part" "$mistral_model"
  rm -rf "$tmp"
}

wanted="$(cat "$req" "$serve_req")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: reusing Python environment $venv" >&2
  fetch_mistral_tokenizer "$venv/bin/python"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating Python environment $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
echo "setup: installing the reference stack from $req into $venv (torch is a large download the first time)" >&2
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$req" -r "$serve_req"
printf '%s\n' "$wanted" > "$stamp"
fetch_mistral_tokenizer "$venv/bin/python"
echo "setup: done" >&2
