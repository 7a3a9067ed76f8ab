#!/usr/bin/env bash
# One-shot set-up: a virtual environment at .venv with the CPU build of torch and this package.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"

# torch first, pinned to the CPU build that lies on this machine's disk: a bare `torch` requirement
# would otherwise pull a multi-GB CUDA build.
TORCH_VERSION=${BLIP2_TORCH_VERSION:-2.13.0}
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  $PIP install "torch==$TORCH_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
fi
# The package with its test extras; the constraint keeps torch where it is.
echo "torch==$TORCH_VERSION" > .venv/torch-constraint.txt
$PIP install -c .venv/torch-constraint.txt -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# caption metrics: the COCO caption toolkit (its scorers only; --no-deps skips pycocotools) and java
$PIP install --no-deps "pycocoevalcap==1.2" 2>&1 | grep -v "^WARNING: Location" || true
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing java (default-jre-headless) for the caption metrics"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless) >/dev/null
  else
    echo "note: java is missing; caption metrics (METEOR, PTB tokenisation) need it" >&2
  fi
fi
# the web page's browser test drives Debian's chromium through playwright (never a browser download)
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "note: chromium could not be installed; the browser test will be skipped" >&2
  fi
fi
.venv/bin/python -c "import blip2, torch; print(f'blip2 {blip2.__version__} ready (torch {torch.__version__})')"
