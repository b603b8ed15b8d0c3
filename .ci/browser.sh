# Sourced by .ci/run: a headless browser for the dashboard's test (tests/test_dashboard.py).
#
# Installs Debian's Chromium and a font (as root) when /usr/bin/chromium is missing. Playwright drives it through
# `executable_path`, so `playwright install` (which downloads its own browser builds) is never needed.
# Without this the dashboard test skips and says why.

if [ ! -x /usr/bin/chromium ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi
echo "Chromium for the dashboard test: $(/usr/bin/chromium --version 2>/dev/null || echo 'not available')"
