#!/usr/bin/env bash
# The committed preprocessing fixtures (tests/fixtures/preprocess/) still equal what Pillow 10.2 and
# transformers 4.37.2 compute from freshly generated images.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHONWARNINGS=ignore python parity/preprocess_fixtures.py --check
