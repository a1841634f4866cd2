#!/usr/bin/env bash
# Builds this source against libtorch 2.11 (tch 0.24.0) instead of the default libtorch 2.0.1 (tch 0.13.0):
#   scripts/libtorch-2.11.sh CARGO_ARGS...     e.g. scripts/libtorch-2.11.sh build --release
# Both torch-sys versions declare `links = "tch"`, so one workspace cannot hold both, not even behind
# features. This writes a second workspace in target/lt211: a copy of Cargo.toml and Cargo.lock with the
# tch and torch-sys pins changed, symbolic links to everything else (the same source), and its own target
# folder (target/lt211/target), then runs cargo there. With no arguments it only writes the workspace.
# LIBTORCH (or ARCANA_VENV, a venv holding torch 2.11) chooses the libtorch as for the default build;
# `check --features tch/doc-only` needs none.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ws="$root/target/lt211"
tch_version=0.24.0
mkdir -p "$ws"
for entry in "$root"/*; do
  name="$(basename "$entry")"
  case "$name" in Cargo.toml | Cargo.lock | target) continue ;; esac
  ln -sfn "$entry" "$ws/$name"
done
# The pins are the only lines that change; fail if the manifest no longer has them as expected.
sed -E -e "s/^tch = \"=[0-9.]+\"$/tch = \"=$tch_version\"/" \
  -e "s/^torch-sys = \"=[0-9.]+\"$/torch-sys = \"=$tch_version\"/" "$root/Cargo.toml" > "$ws/Cargo.toml.new"
if [ "$(diff "$root/Cargo.toml" "$ws/Cargo.toml.new" | grep -c '^>')" != 2 ]; then
  echo "libtorch-2.11: expected exactly the tch and torch-sys pins to change in Cargo.toml" >&2
  exit 1
fi
cmp -s "$ws/Cargo.toml.new" "$ws/Cargo.toml" 2>/dev/null || mv "$ws/Cargo.toml.new" "$ws/Cargo.toml"
rm -f "$ws/Cargo.toml.new"
# The default lock is the starting point, so every other dependency keeps its locked version; cargo
# changes only what the new pins need.
if [ ! -f "$ws/Cargo.lock" ] || [ "$root/Cargo.lock" -nt "$ws/Cargo.lock.base" ]; then
  cp "$root/Cargo.lock" "$ws/Cargo.lock"
  cp "$root/Cargo.lock" "$ws/Cargo.lock.base"
fi
[ $# -eq 0 ] && exit 0
cd "$ws"
exec cargo "$@"
