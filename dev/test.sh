#!/usr/bin/env bash
# Set up the venvs and run every test (skipped ones say why: -rs): bash dev/test.sh [pytest args]
# .venv: the backend and the WebUI stand-ins; .venv-gradio3/4: the panel with the real gradio,
# in chromium where it is installed (dev/test-ui.sh). The gradio venvs are set up in the
# background while the main suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh test
mkdir -p .venv-logs
(bash dev/setup-gradio.sh 3 && bash dev/setup-gradio.sh 4) > .venv-logs/setup-gradio.log 2>&1 &
setup=$!
status=0
.venv/bin/python -m pytest -q -rs "$@" tests || status=$?
if ! wait "$setup"; then
  cat .venv-logs/setup-gradio.log
  echo "setting up the gradio venvs failed"
  exit 1
fi
UNETMODS_UI_VENVS_READY=1 bash dev/test-ui.sh "$@" || status=1
exit $status
