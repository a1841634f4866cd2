#!/usr/bin/env bash
# Writes the folder that a GPU machine without network needs beside the repository, for
# scripts/device-check.sh there (PyTorch 2.11 + CUDA, Python 3.12, its own transformers):
#   bash scripts/device-bundle.sh [DIR]          (default target/device-bundle)
# - the libtorch 2.11 release binaries (scripts/libtorch-2.11.sh build --release), stripped, xz-compressed;
#   they find libtorch through LD_LIBRARY_PATH there (their rpath names this machine's folder);
# - the Python 3.12 wheels of the reference side that machine lacks (the release's transformers 4.37.2 and
#   what it needs at versions that machine's newer stack cannot stand in for), to be installed there with
#   `pip install --no-index --no-deps --target DIR/python DIR/wheels/*.whl`.
# Fails if the folder and the repository's tracked files together reach 60 MiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-target/device-bundle}"
limit=$((60 * 1024 * 1024))
rm -rf "$out"
mkdir -p "$out/bin" "$out/wheels"

# Wheels first: a few MB, and they fail fast without the network.
# sentencepiece 0.1.99 has no CPython 3.12 wheel; 0.2.0 is its first, with the same model format.
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$out/wheels" \
  transformers==4.37.2 tokenizers==0.15.1 huggingface-hub==0.20.3 sentencepiece==0.2.0 protobuf==3.20.3 \
  safetensors==0.4.2

export ARCANA_VENV="${ARCANA_VENV:-$HOME/.cache/arcana/venv-torch-2.11}"
ARCANA_TORCH=2.11 bash scripts/setup-python.sh
unset LIBTORCH
source scripts/env.sh
bash scripts/libtorch-2.11.sh build --release --quiet -p arcana -p arcana-parity --bins
for bin in arcana arcana-parity; do
  strip -o "$out/bin/$bin" "target/lt211/target/release/$bin"
  xz -T0 -9 "$out/bin/$bin"
done
{
  echo "libtorch 2.11 build of $(git rev-parse HEAD) ($(git status --porcelain | grep -q . && echo 'with local changes' || echo clean))"
  echo "made $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version | head -1)"
  (cd "$out" && sha256sum bin/* wheels/*)
} > "$out/MANIFEST"

bundle=$(du -sb "$out" | cut -f1)
repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "device bundle: $out $((bundle / 1024)) KiB + repository $((repo / 1024)) KiB"
if [ $((bundle + repo)) -ge $limit ]; then
  echo "device-bundle: $((bundle + repo)) bytes with the repository, over the 60 MiB limit" >&2
  exit 1
fi
