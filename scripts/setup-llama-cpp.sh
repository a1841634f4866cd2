#!/usr/bin/env bash
# Creates (or reuses) the environment of the llama.cpp peer of the benchmark (`bash scripts/bench.sh
# --peer llama.cpp`), outside the repository and apart from the release's pinned reference stack:
# llama-cpp-python built from its PyPI source (it vendors llama.cpp; about 15 minutes on 2 cores, built
# for this machine's CPU), and that same source tree, whose numpy-only LLaMA converter
# (examples/convert_legacy_llama.py) and gguf-py write the GGUF files. Prints the source tree's path.
# Idempotent: a stamp in the environment records the version; a matching stamp means nothing to do.
set -euo pipefail
version="${ARCANA_LLAMA_CPP_PYTHON:-0.3.36}"
root="${ARCANA_LLAMA_CPP_ROOT:-$HOME/.cache/arcana/llama-cpp-python-$version}"
venv="$root/venv"
src="$root/src"
stamp="$venv/.arcana-llama-cpp"
python="${PYTHON:-python3}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ] && [ -f "$src/vendor/llama.cpp/examples/convert_legacy_llama.py" ]; then
  echo "setup: reusing llama-cpp-python $version in $venv" >&2
  echo "$src"
  exit 0
fi
mkdir -p "$root"
if [ ! -f "$src/pyproject.toml" ]; then
  echo "setup: fetching the llama-cpp-python $version source from PyPI" >&2
  "$python" - "$version" "$root" <<'PY'
import hashlib, json, os, sys, tarfile, urllib.parse, urllib.request
version, root = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-python/json"  # the project's page: mirrors may lack per-version ones
with urllib.request.urlopen(index, timeout=60) as r:
    meta = json.load(r)
sdist = next((u for u in meta["releases"].get(version, []) if u["packagetype"] == "sdist"), None)
if sdist is None:
    sys.exit(f"setup: PyPI lists no source archive for llama-cpp-python {version}")
path = os.path.join(root, sdist["filename"])
url = urllib.parse.urljoin(index, sdist["url"])  # a mirror's addresses may be relative
with urllib.request.urlopen(url, timeout=600) as r, open(path + ".part", "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
digest = hashlib.sha256(open(path + ".part", "rb").read()).hexdigest()
if digest != sdist["digests"]["sha256"]:
    sys.exit(f"setup: {sdist['filename']} has sha256 {digest}, PyPI says {sdist['digests']['sha256']}")
os.replace(path + ".part", path)
with tarfile.open(path) as t:
    top = t.getnames()[0].split("/")[0]
    t.extractall(root, filter="data")
os.replace(os.path.join(root, top), os.path.join(root, "src"))
os.remove(path)
PY
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
echo "setup: building llama-cpp-python $version for this CPU (about 15 minutes on 2 cores)" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# gguf-py's own dependencies (it is used from the source tree) and the converter's SentencePiece.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "numpy>=2.2.6" "sentencepiece>=0.1.98,<0.3.0" \
  "tqdm>=4.27" "pyyaml>=5.1" "requests>=2.25"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" \
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$src"
"$venv/bin/python" -c "import llama_cpp" >&2
echo "$version" > "$stamp"
echo "$src"
