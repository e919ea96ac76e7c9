#!/usr/bin/env bash
# Web UI tiers (run by tests/run.sh after the core tests):
#   1. the A1111/Forge/reForge tab against a stand-in `modules`, under gradio 3.41.2 and under 4.40.0;
#   2. the standalone app in headless Chromium (Debian's chromium + Playwright).
# Each tier has its own venv; missing gradio/playwright/chromium is a failure here, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_FLAGS=(-q --disable-pip-version-check)

setup_venv() {
  local venv=$1; shift
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0 -r requirements.txt -r requirements-dev.txt "$@"
}

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null
fi

echo "== web UI tab under gradio 3.41.2 (A1111 1.10, reForge)"
setup_venv .venv-gradio3 -r tests/requirements-gradio3.txt
MANIFOLD_REQUIRE_GRADIO=1 .venv-gradio3/bin/python -m pytest -c tests/pytest.ini tests/contract/test_webui_tab.py

echo "== web UI tab under gradio 4.40.0 (Forge, standalone app) + the app in headless Chromium"
setup_venv .venv-gradio4 -r requirements-app.txt -r tests/requirements-browser.txt
MANIFOLD_REQUIRE_GRADIO=1 MANIFOLD_REQUIRE_BROWSER=1 \
  .venv-gradio4/bin/python -m pytest -c tests/pytest.ini tests/contract/test_webui_tab.py tests/browser
