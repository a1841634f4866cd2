#!/usr/bin/env bash
# Side-by-side benchmark of the PyTorch path and the `arcana` CLI (speed and memory, one run, one
# machine): sets up the Python environment, builds the release binary, then runs parity/bench/bench.py
# with the given arguments (see `bash scripts/bench.sh --help`). `--small` is a one-minute smoke test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-python.sh
source scripts/env.sh
export PYTHONWARNINGS=ignore
cargo build --release --quiet --bin arcana
ARCANA_BENCH_VIA_SCRIPT=1 exec python parity/bench/bench.py "$@"
