#!/usr/bin/env bash
# Build the docs site and take headless-browser screenshots of its front page and the API page,
# to look at after a change of theme, navigation or API docstrings.
# usage: bash docs/screenshot.sh [OUT_DIR]   (needs pip install -e ".[docs]" and chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/hvpmtl-docs-shots}"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
mkdir -p "$out"
mkdocs build --strict --site-dir "$site" >/dev/null 2>&1 || { echo "mkdocs build --strict failed" >&2; exit 1; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "no chromium found (Debian: apt-get install chromium)" >&2; exit 1; }
for page in index api; do
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
    --screenshot="$out/$page.png" "file://$site/$page.html" >/dev/null 2>&1
  echo "$out/$page.png"
done
