#!/usr/bin/env bash
# Create .venv and install lightning-opd with everything the demo and the tests need.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first and pinned: on the development machines a CPU build of this exact version lies on
# disk, and pinning it keeps pip from pulling a multi-GB CUDA build to satisfy `torch>=2.3`.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The API's web page is tested in a real headless browser: Debian's Chromium (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install Chromium (Debian package 'chromium') for the web page test" >&2
  fi
fi
