#!/usr/bin/env bash
# CPU parity of one libtorch build against PyTorch of the same version, both run here in this run:
#   scripts/check-libtorch.sh 2.11     the libtorch 2.11 build (scripts/libtorch-2.11.sh) against torch 2.11.0
#   scripts/check-libtorch.sh 2.0.1    the default build against torch 2.0.1
# Makes the version's Python environment (scripts/setup-python.sh), builds the binaries against that
# environment's torch/ folder, then runs fresh-seed parity on every preset and case (every tensor
# bit-identical) and the same-run parity and CLI tests (greedy and seeded-sampling ids and texts).
# The tests against committed fixtures (tests/parity.rs, tests/parity_llm.rs) run too, within their
# measured tolerances, and tests/quantization.rs runs the fbgemm shim. A test that skips (no Python
# environment, a binary not built) fails the check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="${1:?usage: scripts/check-libtorch.sh 2.0.1|2.11}"
case "$version" in
  2.0.1) ws="$PWD" ;;
  2.11) bash scripts/libtorch-2.11.sh && ws="$PWD/target/lt211" ;;
  *) echo "check-libtorch: no build for libtorch $version (2.0.1 or 2.11)" >&2; exit 2 ;;
esac
export ARCANA_VENV="$HOME/.cache/arcana/venv-torch-$version"
ARCANA_TORCH="$version" bash scripts/setup-python.sh
# As scripts/env.sh does by default: the libtorch inside the environment's torch wheel, which also
# tells torch-sys its C++ ABI (0 for 2.0.1, 1 for 2.11).
unset LIBTORCH
source scripts/env.sh
export PYTHONWARNINGS=ignore
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
cd "$ws"
echo "== libtorch $version: $torch_dir (workspace $ws)"
python parity/provenance.py
start=$SECONDS
# One package a build, as fresh-parity.sh and the tests build them: together, features unify otherwise
# and each later build compiles arcana again.
cargo build --quiet -p arcana-parity
cargo build --quiet -p arcana-convert
echo "-- built in $((SECONDS - start)) s"
python - "$torch_dir" target/debug/arcana-parity <<'PY'
import subprocess, sys
# The binary must run on the libtorch it was built for, not on another one found first.
ldd = subprocess.run(["ldd", sys.argv[2]], capture_output=True, text=True, check=True).stdout
torch_cpu = [l for l in ldd.splitlines() if "libtorch_cpu.so" in l]
assert torch_cpu and sys.argv[1] in torch_cpu[0], f"{sys.argv[2]} loads {torch_cpu} instead of {sys.argv[1]}"
print("binary loads", torch_cpu[0].split("=>")[1].split("(")[0].strip())
PY

echo "== fresh-seed parity"
start=$SECONDS
bash scripts/fresh-parity.sh
echo "-- fresh parity in $((SECONDS - start)) s"

echo "== same-run parity, committed fixtures and CLI tests"
start=$SECONDS
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --test parity --test parity_llm --test same_machine --test cli --test quantization -- --nocapture 2>&1 | tee "$log"
if grep -q 'skipping: ' "$log"; then
  echo "check-libtorch: a test skipped (see above); the check needs every test to run" >&2
  exit 1
fi
echo "-- tests in $((SECONDS - start)) s"
echo "== libtorch $version: all checks passed"
