"""Values typed by a user (CLI, ComfyUI widgets, the WebUI tab), checked the same way everywhere."""
from __future__ import annotations

from .errors import MergeError

FORBIDDEN_IN_NAMES = "/\\:*?\"<>|"


def parse_numbers(text: str | None, what: str, cast=float) -> list | None:
    """'1, 2 3.5' -> [1.0, 2.0, 3.5]; empty -> None."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [cast(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise MergeError(f"{what}: expected numbers separated by spaces or commas, got {text!r}") from None


def plain_name(text: str | None, what: str = "name") -> str:
    """A new file's name without extension; folders, path separators and hidden names are refused."""
    name = (text or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name:
        raise MergeError(f"{what}: give a name for the new file")
    if any(c in name for c in FORBIDDEN_IN_NAMES) or name.startswith(".") or ".." in name:
        raise MergeError(f"invalid {what} {text!r}: use a plain file name, without folders or path separators")
    return name


def read_data_file(path, what: str, error=MergeError):
    """A YAML or JSON file (JSON by its .json suffix) as data; `error` (a MergeError class) with a one-line
    message naming `what` and the file when it is missing, unreadable or not valid."""
    import json
    from pathlib import Path
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {p}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {p}: cannot read it ({exc})") from None
    is_json = p.suffix.lower() == ".json"
    try:
        if is_json:
            return json.loads(text)
        import yaml
        return yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what} {p}: not valid {'JSON' if is_json else 'YAML'} ({first})") from None
