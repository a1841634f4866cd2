#!/usr/bin/env bash
# Installs what the browser test (tests/serve_web.rs) needs: Debian's chromium and playwright-core from
# npm (driving /usr/bin/chromium; `npx playwright install` is not used because it downloads browsers).
# Idempotent: each step is skipped when its result is there. Exits 0 with a message when something
# cannot be installed, so that the test then skips with its own message.
set -u
DIR="${ARCANA_BROWSER_DIR:-$HOME/.cache/arcana/browser}"

if command -v chromium >/dev/null 2>&1; then
    echo "setup-browser: chromium present ($(command -v chromium))"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "setup-browser: installing chromium and chromium-driver with apt-get"
    if ! { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null; then
        echo "setup-browser: could not install chromium with apt-get (no root or no network?); the browser test will skip"
        exit 0
    fi
else
    echo "setup-browser: no chromium and no apt-get; the browser test will skip"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "setup-browser: npm is missing (install nodejs and npm); the browser test will skip"
    exit 0
fi
if [ -f "$DIR/node_modules/playwright-core/package.json" ]; then
    echo "setup-browser: playwright-core present in $DIR"
else
    echo "setup-browser: installing playwright-core into $DIR"
    mkdir -p "$DIR"
    [ -f "$DIR/package.json" ] || echo '{"name": "arcana-browser-test", "private": true}' > "$DIR/package.json"
    if ! (cd "$DIR" && npm install --no-audit --no-fund --silent playwright-core@1 >/dev/null); then
        echo "setup-browser: npm could not install playwright-core (no network?); the browser test will skip"
        exit 0
    fi
fi
echo "setup-browser: ready (chromium $(chromium --version 2>/dev/null | awk '{print $2}'), playwright-core $(node -p "require('$DIR/node_modules/playwright-core/package.json').version" 2>/dev/null))"
