"""A real ComfyUI, headless on 127.0.0.1, for the e2e tier (COMFYUI_DIR: a checkout; COMFYUI_PYTHON: the
interpreter of an environment that runs it). Only this machine's loopback is ever contacted."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post_json(url, payload):
    """POST JSON; the answer's JSON, also for a 400 (ComfyUI's validation errors), {} for an empty one."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
    except urllib.error.HTTPError as err:
        body = err.read()
    return json.loads(body) if body else {}


@contextlib.contextmanager
def serve(base: Path, extra_args=()):
    """ComfyUI with `base/paths.yaml` as its extra model paths (this repository linked as a custom node
    there), its output in `base/output`; yields its URL and stops it afterwards."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    port = free_port()
    log = open(base / "comfyui.log", "w")
    server = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--output-directory", str(base / "output"), "--disable-auto-launch",
                               "--disable-api-nodes", "--extra-model-paths-config", str(base / "paths.yaml"),
                               *extra_args], cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                get_json(url + "/system_stats")
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError((base / "comfyui.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
