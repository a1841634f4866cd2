#!/usr/bin/env bash
# The project's test command: sets up the Python reference environment, regenerates every recorded
# fixture from Python and compares, runs the Rust tests, then checks parity on freshly made checkpoints.
# The parity parts then run again under a second CPU kernel path (other ATen kernels, MKL limited to
# AVX2, one thread), where same-run comparisons must still be bit-identical and the committed fixtures
# (made on another machine) must still be within their measured tolerances.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-python.sh
bash scripts/setup-nginx.sh
bash scripts/setup-browser.sh
source scripts/env.sh
export PYTHONWARNINGS=ignore

echo "== this machine"
python parity/provenance.py

echo "== recorded fixtures still match the Python reference"
for check in parity/fixture_checks.d/*.sh; do
  [ -e "$check" ] || continue
  echo "-- $check"
  bash "$check"
done

echo "== formatting and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The same source against libtorch 2.11 (tch 0.24), so that neither build rots. tch's `doc-only` needs
# no libtorch; the shared target folder reuses the dependencies clippy has just checked (about a minute).
echo "== the libtorch 2.11 build compiles and lints (scripts/libtorch-2.11.sh)"
CARGO_TARGET_DIR="$PWD/target" bash scripts/libtorch-2.11.sh clippy --workspace --all-targets --quiet \
  --features tch/doc-only -- -D warnings

echo "== cargo test"
cargo test --workspace

# The benchmark harness end to end at tiny widths (scripts/bench.sh --small without its release build:
# cargo test has just built the debug binary); its timings are not results, the ids must match.
echo "== benchmark harness: PyTorch and arcana exact on the --small checkpoint"
python parity/bench/bench.py --small --binary target/debug/arcana --check --out target/bench-small.json

echo "== parity on checkpoints made with a new seed"
bash scripts/fresh-parity.sh

# The second kernel path: ATen's scalar kernels (or AVX2 ones when the caller already chose the scalar
# path), MKL's AVX2 code, one thread. Both the Python and the Rust side inherit it.
if [ "${ATEN_CPU_CAPABILITY:-}" = "default" ]; then second_aten=avx2; else second_aten=default; fi
second=(ATEN_CPU_CAPABILITY="$second_aten" MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)
echo "== second kernel path: ${second[*]}"
env "${second[@]}" python parity/provenance.py
env "${second[@]}" bash parity/fixture_checks.d/parity-export.sh
env "${second[@]}" cargo test --test parity --test parity_llm --test same_machine --test cli
env "${second[@]}" bash scripts/fresh-parity.sh
echo "== all checks passed on both kernel paths"
