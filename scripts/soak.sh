#!/usr/bin/env bash
# The serving soak test for longer: valid traffic mixed with hostile requests against `arcana-serve all`
# on the tiny checkpoint, loopback only, for ARCANA_SOAK_SECONDS (default 300), in the test command's
# build (dependencies optimized). The test command runs the same test for 20 s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
ARCANA_SOAK_SECONDS="${ARCANA_SOAK_SECONDS:-300}" cargo test --test serve_soak -- --nocapture
