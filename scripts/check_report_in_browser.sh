#!/usr/bin/env bash
# Render an `ovsam-batch report` page in headless Chromium (Debian's `chromium` package) and save a
# screenshot, to see the page as a person would: no network, a fresh profile, nothing fetched.
#
#   scripts/check_report_in_browser.sh REPORT.html SCREENSHOT.png [WIDTH,HEIGHT]
#
# Exits non-zero if Chromium is missing or writes no screenshot. Install it with `apt-get install -y chromium`.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 REPORT.html SCREENSHOT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
report=$(realpath "$1")
screenshot=$(realpath -m "$2")
window=${3:-1280,2400}
browser=${CHROMIUM:-/usr/bin/chromium}

if [[ ! -x "$browser" ]]; then
    echo "no Chromium at $browser (apt-get install -y chromium, or set CHROMIUM=path)" >&2
    exit 3
fi
if [[ ! -f "$report" ]]; then
    echo "no report at $report" >&2
    exit 2
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$screenshot"
# --no-sandbox: root in a container has no user namespaces; the page is our own file.
# The network switches keep Chromium from calling home, so the page is seen exactly as offline.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$screenshot" --window-size="$window" "file://$report" >"$profile/chromium.log" 2>&1 || {
    cat "$profile/chromium.log" >&2
    exit 4
}
if [[ ! -s "$screenshot" ]]; then
    cat "$profile/chromium.log" >&2
    echo "Chromium wrote no screenshot" >&2
    exit 4
fi
echo "$screenshot"
