#!/usr/bin/env bash
# Sets up a fresh clone: Debian's Fashion-MNIST package (where apt is available), a virtual
# environment with the pinned packages, and DVC. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    echo "setup: installed Debian's dataset-fashion-mnist"
  else
    echo "setup: could not install dataset-fashion-mnist; put the Fashion-MNIST IDX files in data/ (see README)" >&2
  fi
fi

# The raw data lives in data/ (a dependency of the prepare stage): link the Debian files there.
if [ -d /usr/share/datasets/fashion-mnist ] && [ ! -e data/fashion_mnist ]; then
  mkdir -p data/fashion_mnist
  ln -s /usr/share/datasets/fashion-mnist/*-ubyte.gz data/fashion_mnist/
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"

[ -d .git ] || git init -q
[ -d .dvc ] || .venv/bin/dvc init -q
echo "setup: done. Activate with: source .venv/bin/activate"
