#!/usr/bin/env bash
# Create a test venv with a real gradio for the UI tests: dev/setup-gradio.sh 3|4
#   3 -> .venv-gradio3: gradio 3.41.2 as in A1111 1.10 (fastapi 0.94, pydantic 1)
#   4 -> .venv-gradio4: gradio 4.40.0 as in Forge
# Never installs gradio into .venv (the backend's test venv, where tests use the gradio stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."
major="${1:?usage: dev/setup-gradio.sh 3|4}"
venv=".venv-gradio$major"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
bash dev/install-torch.sh "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -r dev/requirements.txt -r "dev/requirements-gradio$major.txt"
"${pip[@]}" --no-deps -r dev/requirements-nodeps.txt
