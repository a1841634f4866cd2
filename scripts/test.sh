#!/usr/bin/env bash
# The project's test command: sets up the Python reference environment, regenerates every recorded
# fixture from Python and compares, runs the Rust tests, then checks parity on freshly made checkpoints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-python.sh
source scripts/env.sh

echo "== recorded fixtures still match the Python reference"
for check in parity/fixture_checks.d/*.sh; do
  [ -e "$check" ] || continue
  echo "-- $check"
  bash "$check"
done

echo "== cargo test"
cargo test --workspace

echo "== parity on checkpoints made with a new seed"
bash scripts/fresh-parity.sh
