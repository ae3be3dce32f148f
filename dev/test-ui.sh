#!/usr/bin/env bash
# The UI tests with the real gradio 3.41.2 (A1111 1.10) and 4.40.0 (Forge), and in Debian's
# chromium (apt-get install chromium chromium-driver): dev/test-ui.sh [pytest args].
# Sets up .venv-gradio3 / .venv-gradio4 first unless UNETMODS_UI_VENVS_READY=1; the two
# gradio versions are tested at the same time (each test mostly waits on its browser).
set -euo pipefail
cd "$(dirname "$0")/.."
export GRADIO_ANALYTICS_ENABLED=False  # no telemetry or version check over the network
mkdir -p .venv-logs
pids=()
for major in 3 4; do
  [ "${UNETMODS_UI_VENVS_READY:-}" = 1 ] || bash dev/setup-gradio.sh "$major"
  ".venv-gradio$major/bin/python" -m pytest -q -p no:cacheprovider "$@" tests/test_ui_gradio.py tests/browser \
    > ".venv-logs/ui-gradio$major.log" 2>&1 &
  pids+=($!)
done
status=0
for i in 0 1; do
  wait "${pids[$i]}" || status=1
  echo "== UI tests, gradio $((i + 3))"
  cat ".venv-logs/ui-gradio$((i + 3)).log"
done
exit $status
