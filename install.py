"""Installer run by AUTOMATIC1111 / Forge / reForge (and by ComfyUI-Manager, which has no `launch`).

Installs only the missing non-torch requirements through the WebUI's own pip
helper. Never installs or upgrades torch, torchvision or xformers.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

NEVER = {"torch", "torchvision", "torchaudio", "xformers"}
REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def requirements(path: Path = REQUIREMENTS) -> list[tuple[str, str]]:
    """(distribution name, requirement line) for every line that is not torch-like."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
        if name.lower() not in NEVER:
            out.append((name, line))
    return out


def main() -> int:
    try:
        import launch  # the WebUI's launch helpers; absent under ComfyUI-Manager
    except ImportError:
        return 0
    for name, line in requirements():
        if not launch.is_installed(name):
            launch.run_pip(f"install \"{line}\"", f"Manifold Merge requirement: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
