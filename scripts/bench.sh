#!/usr/bin/env bash
# Side-by-side benchmark of the PyTorch path and the `arcana` CLI (speed and memory, one run, one
# machine): sets up the Python environment, builds the release binary, then runs parity/bench/bench.py
# with the given arguments (see `bash scripts/bench.sh --help`). `--small` is a one-minute smoke test.
# `bash scripts/bench.sh --batch [ARGS]` runs parity/bench/batch.py instead: concurrent streams through
# the worker's continuous batching against the same requests one at a time. `bash scripts/bench.sh --load
# [ARGS]` runs parity/bench/load.py: 1, 8 and 32 clients through a controller, batched against --max-batch 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-python.sh
source scripts/env.sh
export PYTHONWARNINGS=ignore
if [ "${1:-}" = "--batch" ] || [ "${1:-}" = "--load" ]; then
  script="parity/bench/${1#--}.py"
  shift
  cargo build --release --quiet --bin arcana-serve
  exec python "$script" "$@"
fi
cargo build --release --quiet --bin arcana
cargo build --release --quiet -p arcana-convert
ARCANA_BENCH_VIA_SCRIPT=1 exec python parity/bench/bench.py "$@"
