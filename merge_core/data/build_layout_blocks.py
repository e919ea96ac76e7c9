"""Write the "block" field of every tensor in data/layouts/*.json from the block rules.

    python -m merge_core.data.build_layout_blocks          # rewrite the layouts
    python -m merge_core.data.build_layout_blocks --check  # exit 1 if a stored field is stale

The field is the key's list-form block (BASE, IN00..., D00..., J00...) under checkpoint
naming, as `merge_core.blocks.architecture(arch).block(key, "checkpoint")` gives it. Both modes also check
that the data's detect sections (merge_core.arch) detect every layout as its own architecture.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from merge_core.arch import detect_architecture
from merge_core.blocks import architecture

LAYOUT_DIR = Path(__file__).parent / "layouts"


def expected_blocks(layout: dict) -> list[str]:
    arch = architecture(layout["architecture"])  # "sd15" is one of the accepted spellings of sd1
    return [arch.block(t["key"], "checkpoint") for t in layout["tensors"]]


def detection_error(layout: dict) -> str | None:
    """None when the data detects the layout as its own architecture, else what it detects."""
    want = architecture(layout["architecture"]).name
    found = detect_architecture({t["key"]: tuple(t["shape"]) for t in layout["tensors"]})
    return None if found == want else f"{layout['architecture']} is detected as {found}"


def with_blocks(layout: dict) -> dict:
    tensors = []
    for t, block in zip(layout["tensors"], expected_blocks(layout)):
        entry = {k: v for k, v in t.items() if k != "block"}
        entry["block"] = block
        tensors.append(entry)
    return {**layout, "tensors": tensors}


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale, wrong = [], []
    for path in sorted(LAYOUT_DIR.glob("*.json")):
        text = path.read_text(encoding="utf-8")
        layout = json.loads(text)
        error = detection_error(layout)
        if error:
            wrong.append(f"{path.name}: {error}")
        new = json.dumps(with_blocks(layout), separators=(",", ":"))
        if new != text:
            stale.append(path.name)
            if not check:
                path.write_text(new, encoding="utf-8")
    if stale:
        print(("stale: " if check else "updated: ") + ", ".join(stale))
    for line in wrong:
        print("detection: " + line)
    return 1 if (check and stale) or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
