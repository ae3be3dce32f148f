#!/usr/bin/env bash
# Regenerate docs/panel.png (the README's picture of the panel) with the browser test, gradio 4.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-gradio4/bin/python ] || bash dev/setup-gradio.sh 4
UNETMODS_SCREENSHOT="$PWD/docs/panel.png" .venv-gradio4/bin/python -m pytest -q -p no:cacheprovider tests/browser
# a 256-colour palette keeps the file small
.venv-gradio4/bin/python -c "from PIL import Image; Image.open('docs/panel.png').convert('RGB').quantize(256).save('docs/panel.png', optimize=True)"
