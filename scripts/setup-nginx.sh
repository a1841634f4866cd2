#!/usr/bin/env bash
# Installs Debian's nginx, used by the serving tests as a standard load balancer in front of two workers
# (no controller). Idempotent; where it cannot install (not root, no apt), it says so and the test skips.
set -uo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  echo "setup: nginx present" >&2
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: nginx missing and cannot be installed here (needs root and apt-get); its test will skip" >&2
  exit 0
fi
echo "setup: installing nginx (Debian package)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx; } >/dev/null 2>&1; then
  echo "setup: installing nginx failed; its test will skip" >&2
fi
exit 0
