#!/usr/bin/env bash
# Install torch into a venv that has none yet: dev/install-torch.sh VENV
# From $TORCH_INDEX_URL when set: the CPU-only build is enough for the benchmark and the tests
# (TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, about 0.2 GB to download); without it pip
# takes PyPI's default build, which on Linux is the CUDA one (several GB).
set -euo pipefail
venv="${1:?usage: dev/install-torch.sh VENV}"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing torch into $venv${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (once; set TORCH_INDEX_URL to choose the build, see README)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    -r "$(dirname "$0")/requirements-torch.txt"
fi
