#!/usr/bin/env bash
# The README's test command: set up a venv and run every test tier that can run here.
#   bash tests/run.sh            core + contract tests (+ web UI tiers when their setup script exists)
# Real-host tiers run only when COMFYUI_DIR (ComfyUI checkout) is set; see docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 -r requirements.txt -r requirements-dev.txt
"$VENV/bin/python" -m pytest -c tests/pytest.ini tests/unit tests/contract tests/e2e "$@"
if [ -f .ci/webui.sh ] && [ -z "${SKIP_WEBUI:-}" ]; then
  bash .ci/webui.sh
fi
