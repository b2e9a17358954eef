#!/usr/bin/env bash
# Make sure a headless browser exists for tests/test_demo.py, which loads the MLflow UI that `qformer ui`
# starts as a person would see it. Idempotent: does nothing when chromium is on PATH; otherwise installs
# Debian's chromium (root + apt). Never fails the caller: the test names a missing browser itself.
set -u
have_browser() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
have_browser && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: installing Debian's chromium (once)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }
fi
have_browser || echo "ensure_chromium: no chromium available (apt-get install chromium)" >&2
exit 0
