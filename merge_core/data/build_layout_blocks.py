"""Write the "block" field of every tensor in data/layouts/*.json from the block rules.

    python -m merge_core.data.build_layout_blocks          # rewrite the layouts
    python -m merge_core.data.build_layout_blocks --check  # exit 1 if a stored field is stale

The field is the key's list-form block (BASE, IN00..., D00..., J00...) under checkpoint
naming, as `merge_core.blocks.architecture(arch).block(key, "checkpoint")` gives it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from merge_core.blocks import architecture

LAYOUT_DIR = Path(__file__).parent / "layouts"
LAYOUT_ARCH = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


def expected_blocks(layout: dict) -> list[str]:
    arch = architecture(LAYOUT_ARCH[layout["architecture"]])
    return [arch.block(t["key"], "checkpoint") for t in layout["tensors"]]


def with_blocks(layout: dict) -> dict:
    tensors = []
    for t, block in zip(layout["tensors"], expected_blocks(layout)):
        entry = {k: v for k, v in t.items() if k != "block"}
        entry["block"] = block
        tensors.append(entry)
    return {**layout, "tensors": tensors}


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for path in sorted(LAYOUT_DIR.glob("*.json")):
        text = path.read_text(encoding="utf-8")
        new = json.dumps(with_blocks(json.loads(text)), separators=(",", ":"))
        if new != text:
            stale.append(path.name)
            if not check:
                path.write_text(new, encoding="utf-8")
    if stale:
        print(("stale: " if check else "updated: ") + ", ".join(stale))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
