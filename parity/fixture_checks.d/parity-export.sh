#!/usr/bin/env bash
# The committed parity fixtures (tests/fixtures/parity/<preset>/) still equal a fresh PyTorch export.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHONWARNINGS=ignore python parity/export.py fixtures --check
