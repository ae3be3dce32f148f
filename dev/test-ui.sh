#!/usr/bin/env bash
# The UI tests with the real gradio 3.41.2 (A1111 1.10) and 4.40.0 (Forge), and in Debian's
# chromium (apt-get install chromium chromium-driver): dev/test-ui.sh [pytest args].
# Sets up .venv-gradio3 / .venv-gradio4 first unless UNETMODS_UI_VENVS_READY=1.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for major in 3 4; do
  [ "${UNETMODS_UI_VENVS_READY:-}" = 1 ] || bash dev/setup-gradio.sh "$major"
  echo "== UI tests, gradio $major"
  ".venv-gradio$major/bin/python" -m pytest -q -p no:cacheprovider "$@" tests/test_ui_gradio.py tests/browser || status=1
done
exit $status
