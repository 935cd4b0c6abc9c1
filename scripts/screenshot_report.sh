#!/usr/bin/env bash
# Screenshot of a rendered report with headless Chromium (e.g. for the README).
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]   (default 1200,3000)
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
report=$1
out=$2
size=${3:-1200,3000}

browser=""
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then browser=$name; break; fi
done
if [ -z "$browser" ]; then
  echo "error: no chromium, chromium-browser or google-chrome on PATH (Debian: apt-get install chromium)" >&2
  exit 2
fi
if [ ! -f "$report" ]; then
  echo "error: report not found: $report" >&2
  exit 2
fi

report_abs=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
mkdir -p "$(dirname "$out")"
out_abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
  --user-data-dir="$profile" --window-size="$size" --screenshot="$out_abs" "file://$report_abs" \
  >/dev/null 2>&1
[ -s "$out_abs" ] || { echo "error: $browser wrote no screenshot to $out_abs" >&2; exit 1; }
echo "wrote $out_abs"
