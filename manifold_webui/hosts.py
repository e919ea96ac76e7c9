"""One adapter per host: where checkpoints and LoRAs live, how the host's list is refreshed,
how its progress bar is driven and how a merged model gets into the running model.

`StandaloneHost` is the `python -m merge_core app` case (no WebUI). The WebUI
adapters import the host's `modules` package lazily, inside their methods, so
this file imports without any host.

Loading a merge without writing a file:
- A1111 1.10 and reForge: `sd_models.load_model(info, already_loaded_state_dict=...)`
  with a copy of the first input's CheckpointInfo renamed to the merge, and the
  copy registered as an alias so the next generation does not reload from disk.
- Forge: `load_model` is a stub there; `backend.loader.forge_loader(state_dict)`
  builds the model, and `model_data.forge_hash` is set to the current loading
  parameters so `forge_model_reload()` keeps it until the user picks another
  checkpoint.
"""
from __future__ import annotations

import copy
import functools
import gc
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from merge_core.errors import MergeError
from merge_core.io.sources import CHECKPOINT_SUFFIXES


@dataclass
class Settings:
    dtype: str = "auto"          # auto | fp16 | bf16 | fp32
    device: str = "host"         # host | auto | cpu | cuda
    threads: int = 0             # 0 = automatic
    keep_in_ram: bool = False    # keep the last "Merge and load" result so Save writes it without re-merging


@functools.lru_cache(maxsize=4096)
def _lora_info(path: str, size: int, mtime: float):
    """What a .safetensors file is if it is a LoRA (read from its header only), else None; cached per version."""
    from merge_core.errors import MergeError as _Error
    from merge_core.io.sources import open_model
    from merge_core.lora.format import describe_lora
    try:
        with open_model(path) as src:
            return describe_lora(src.specs())
    except (_Error, OSError):
        return None


def is_lora_file(path: Path) -> bool:
    """LoRA files are never offered as checkpoints (a LoRA merged as a checkpoint is always an error)."""
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return _lora_info(str(path), st.st_size, st.st_mtime) is not None


def _checkpoint_files(folder: Path, exclude=()) -> list[Path]:
    """The checkpoint files under `folder`, hidden files and folders and the `exclude` folders (LoRA, VAE)
    left out, and LoRA files wherever they are. Symlinked sub-folders are followed, as A1111 does
    (`shared.walk_files`); a folder reached twice (a link back up the tree, or two links to one place) is
    listed once."""
    if not folder.is_dir():
        return []
    exclude = [exclude] if isinstance(exclude, Path) else [e for e in exclude if e is not None]
    skip = {e.resolve() for e in exclude}
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        root_path = Path(root)
        real = root_path.resolve()
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() not in skip)
        found += [root_path / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in CHECKPOINT_SUFFIXES
                  and not is_lora_file(root_path / f)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix().lower())


Entry = TypeVar("Entry")


def shown(name) -> str:
    """A user-supplied name as one line of a message: quoted, control characters escaped, long ones cut."""
    if not isinstance(name, str):
        return repr(name)[:80]
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    return f'"{text[:157]}..."' if len(text) > 160 else f'"{text}"'


def pick_listed(name, listed: Mapping[str, Entry], folder: Path, file_of: Callable[[Entry], Path | str] = Path,
                place: str = "models folder") -> Entry:
    """The one place where a name that came from the tab or its HTTP API becomes a file to read.

    Rule: the name must be one of the names the host itself lists for that folder (the standalone
    folder scan, or the WebUI's `checkpoints_list`), and the listed entry must still be a file.
    Everything else is refused before any path is built from it: absolute paths, `..`, names in
    hidden or LoRA folders, directories, empty names, NUL bytes, non-strings. A gradio endpoint takes
    any string, so the dropdown's choices protect nothing; the list does.

    Why the list and not "resolved path inside the folder": a symlinked checkpoint or sub-folder
    inside the models folder is a common setup (models on another drive); the list includes it
    because the user put it there, while a name from a request can only pick among what is listed,
    never walk out of the folder. A WebUI title that gained " [hash]" after the list was read, or
    lost it, is matched by its name without the hash.
    """
    entry = None
    if isinstance(name, str) and name and "\0" not in name:
        entry = listed.get(name)
        if entry is None and " [" in name:
            entry = listed.get(name.split(" [", 1)[0])
    if entry is None:
        raise MergeError(f"{shown(name)}: not a checkpoint in the {place} ({folder}); pick one from the list "
                         f"(Refresh rescans the folder)")
    path = Path(file_of(entry))
    try:
        is_file = path.resolve().is_file()
    except (OSError, RuntimeError):  # a symlink loop
        is_file = False
    if not is_file:
        raise MergeError(f"{shown(name)}: checkpoint not found in the {place} ({folder}); press Refresh")
    return entry


class Host:
    """The standalone app: a models folder and a LoRA folder, no running model."""

    name = "standalone"
    can_hot_load = False
    can_switch = False

    def __init__(self, checkpoint_dir, lora_dir=None, settings: Settings | None = None):
        self._checkpoint_dir = Path(checkpoint_dir)
        self._lora_dir = Path(lora_dir) if lora_dir is not None else self._checkpoint_dir / "Lora"
        self._settings = settings or Settings()

    # folders and the checkpoint list
    def checkpoint_dir(self) -> Path:
        return self._checkpoint_dir

    def lora_dir(self) -> Path:
        return self._lora_dir

    def vae_dir(self) -> Path:
        return self._checkpoint_dir / "VAE"

    def _listed(self) -> dict[str, Path]:
        folder = self.checkpoint_dir()
        return {p.relative_to(folder).as_posix(): p
                for p in _checkpoint_files(folder, exclude=(self.lora_dir(), self.vae_dir()))}

    def list_vaes(self) -> list[str]:
        """VAE files (the VAE folder's), by their names in that folder."""
        folder = self.vae_dir()
        return [p.relative_to(folder).as_posix() for p in _checkpoint_files(folder)]

    def vae_path(self, name: str) -> Path:
        folder = self.vae_dir()
        listed = {p.relative_to(folder).as_posix(): p for p in _checkpoint_files(folder)}
        return pick_listed(name, listed, folder, place="VAE folder")

    def list_checkpoints(self) -> list[str]:
        return list(self._listed())

    def checkpoint_paths(self, names: list[str]) -> list[Path]:
        """The files of listed checkpoints (see `pick_listed`: nothing outside the list is ever opened)."""
        listed = self._listed()
        return [pick_listed(n, listed, self.checkpoint_dir()) for n in names]

    def checkpoint_path(self, name: str) -> Path:
        return self.checkpoint_paths([name])[0]

    def refresh(self) -> None:
        """The standalone list is read from disk every time."""

    def saved_title(self, path: Path) -> str:
        return path.relative_to(self.checkpoint_dir()).as_posix()

    # settings, device, progress
    def settings(self) -> Settings:
        return self._settings

    def default_device(self) -> str:
        return "auto"

    def begin_job(self, job: str, total: int) -> None:
        pass

    def job_step(self, done: int, total: int, text: str) -> None:
        pass

    def end_job(self) -> None:
        pass

    def interrupted(self) -> bool:
        return False

    # the running model
    def hot_load(self, state_dict: dict, title: str, template_name: str, recipe: str) -> str:
        raise MergeError(f"{self.name}: there is no running model to load into; use Save instead")

    def switch_to(self, title: str) -> str:
        raise MergeError(f"{self.name}: there is no running model to switch; the file is saved")


class WebUIHost(Host):
    """AUTOMATIC1111 1.10 (and the parts Forge and reForge share with it)."""

    name = "AUTOMATIC1111"
    can_hot_load = True
    can_switch = True

    def __init__(self):
        super().__init__(".")

    def checkpoint_dir(self) -> Path:
        from modules import sd_models, shared
        return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)

    def lora_dir(self) -> Path:
        from modules import paths, shared
        return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))

    def vae_dir(self) -> Path:
        from modules import paths, shared
        return Path(getattr(shared.cmd_opts, "vae_dir", None) or os.path.join(paths.models_path, "VAE"))

    def list_checkpoints(self) -> list[str]:
        from modules import sd_models
        listed = self._listed()
        return [t for t in sd_models.checkpoint_tiles() if t in listed]

    def _listed(self) -> dict:
        """The host's checkpoint list by the names the tab may hold: the title (what `checkpoint_tiles()`
        shows), the short title (A1111's "short names" option) and the name without a hash. Never
        `get_closet_checkpoint_match`: it matches any substring of a title, and its aliases hold the
        in-memory merges, whose files are made up."""
        from modules import sd_models
        listed: dict = {}
        for info in sd_models.checkpoints_list.values():
            if is_lora_file(Path(info.filename)):  # a LoRA in the checkpoint folder is not a checkpoint
                continue
            for key in (info.title, getattr(info, "short_title", None), getattr(info, "name", None)):
                if isinstance(key, str) and key:
                    listed.setdefault(key, info)
        return listed

    def _info(self, name: str):
        return pick_listed(name, self._listed(), self.checkpoint_dir(), lambda info: info.filename)

    def checkpoint_paths(self, names: list[str]) -> list[Path]:
        listed = self._listed()
        return [Path(pick_listed(n, listed, self.checkpoint_dir(), lambda info: info.filename).filename)
                for n in names]

    def refresh(self) -> None:
        from modules import sd_models
        sd_models.list_models()

    def saved_title(self, path: Path) -> str:
        from modules import sd_models
        for info in sd_models.checkpoints_list.values():
            if Path(info.filename).resolve() == path.resolve():
                return info.title
        return path.name

    def settings(self) -> Settings:
        from modules import shared
        opts = shared.opts
        return Settings(dtype=getattr(opts, "manifold_merge_dtype", "auto"),
                        device=getattr(opts, "manifold_merge_device", "host"),
                        threads=int(getattr(opts, "manifold_merge_threads", 0) or 0),
                        keep_in_ram=bool(getattr(opts, "manifold_merge_keep_in_ram", False)))

    def default_device(self) -> str:
        from modules import devices
        return str(devices.device)

    def begin_job(self, job: str, total: int) -> None:
        from modules import shared
        shared.state.begin(job=job)
        shared.state.job_count = 1
        shared.state.sampling_steps = total
        shared.state.sampling_step = 0

    def job_step(self, done: int, total: int, text: str) -> None:
        from modules import shared
        shared.state.sampling_steps = total
        shared.state.sampling_step = done
        shared.state.textinfo = text

    def end_job(self) -> None:
        from modules import shared
        shared.state.end()

    def interrupted(self) -> bool:
        from modules import shared
        return bool(getattr(shared.state, "interrupted", False))

    def _merged_info(self, template_name: str, title: str, recipe: str):
        """A CheckpointInfo for a merge that exists only in memory, copied from the first input's.

        - Its hash is the recipe's, and it never hashes or registers itself: A1111's
          calculate_shorthash() would hash a file and add the merge to the checkpoint list.
        - Its filename is made up (beside the first input, never created): the hosts skip a load
          when the loaded model has the same filename (reForge's load_model, everyone's
          reload_model_weights), so it must differ from the input's and from other recipes'.
          Without a .yaml beside it the host reads the model's config off the state dict.
        """
        template = self._info(template_name)

        class MergedCheckpointInfo(type(template)):
            in_memory_merge = True

            def calculate_shorthash(self):
                return self.shorthash

            def register(self):
                pass

        info = MergedCheckpointInfo.__new__(MergedCheckpointInfo)
        info.__dict__.update(copy.copy(template.__dict__))
        digest = hashlib.sha256(recipe.encode()).hexdigest()
        info.filename = str(Path(template.filename).with_name(f"{title}.{digest[:10]}.in-memory-merge"))
        info.name = info.name_for_extra = info.model_name = title
        info.title = f"{title} [{digest[:10]}]"
        info.hash, info.sha256, info.shorthash = digest[:8], digest, digest[:10]
        info.ids = [title, info.title]
        info.template_title = template.title  # the file to go back to if this merge's weights are lost
        return info

    def _load(self, info, state_dict: dict) -> None:
        from modules import sd_models
        sd_models.load_model(info, already_loaded_state_dict=state_dict)

    def _select(self, info) -> None:
        """Make the loaded merge the selected checkpoint. The next generation resolves
        opts.sd_model_checkpoint through the aliases; without this entry it would fall back to
        another checkpoint and reload it from disk."""
        from modules import sd_models, shared
        self._forget_merges()
        sd_models.checkpoint_aliases[info.title] = info
        shared.opts.data["sd_model_checkpoint"] = info.title

    def _forget_merges(self) -> None:
        """Drop the aliases of earlier in-memory merges: their weights are gone once another model
        is loaded, and their made-up files cannot be loaded again."""
        from modules import sd_models
        for key in [k for k, v in sd_models.checkpoint_aliases.items() if getattr(v, "in_memory_merge", False)]:
            del sd_models.checkpoint_aliases[key]

    def _on_disk(self, selected: str | None, template_name: str) -> str:
        """The checkpoint to fall back to after a failed load, a real file: the selected one; for an
        earlier in-memory merge, that merge's first input (the host loaded its kind before); else
        the failed merge's first input."""
        from modules import sd_models
        info = sd_models.get_closet_checkpoint_match(selected) if selected else None
        if info is not None and getattr(info, "in_memory_merge", False):
            info = sd_models.get_closet_checkpoint_match(info.template_title)
        if info is not None and Path(info.filename).is_file():
            return info.title
        return self._info(template_name).title

    def _recover(self, fallback: str) -> None:
        """After a failed load (the old model may be gone): the next generation loads `fallback`."""
        from modules import shared
        self._forget_merges()
        shared.opts.data["sd_model_checkpoint"] = fallback

    def hot_load(self, state_dict: dict, title: str, template_name: str, recipe: str) -> str:
        from modules import shared
        info = self._merged_info(template_name, title, recipe)
        fallback = self._on_disk(shared.opts.data.get("sd_model_checkpoint"), template_name)
        try:
            self._load(info, state_dict)
        except Exception as exc:
            self._recover(fallback)
            raise MergeError(f"{self.name} could not load the merge ({type(exc).__name__}: {exc}); nothing was "
                             f"written, and the next generation loads {fallback} from its file") from exc
        self._select(info)
        return f"loaded {title} into the running model ({self.name}); nothing was written to disk"

    def switch_to(self, title: str) -> str:
        from modules import shared
        info = self._info(title)
        shared.opts.data["sd_model_checkpoint"] = info.title
        self._load_file(info)
        return f"switched to {info.title}"

    def _load_file(self, info) -> None:
        from modules import sd_models
        sd_models.reload_model_weights(info=info)


class ReForgeHost(WebUIHost):
    """reForge: `load_model(info, already_loaded_state_dict)` works as in A1111
    (its `load_model_weights` is a stub, which we do not use)."""

    name = "reForge"

    def _load_file(self, info) -> None:
        from modules import sd_models
        sd_models.load_model(info)


class ForgeHost(WebUIHost):
    """Forge: loading goes through `forge_model_reload()` and its loading parameters."""

    name = "Forge"

    def _load(self, info, state_dict: dict) -> None:
        from backend import memory_management
        from backend.loader import forge_loader
        from modules import script_callbacks, sd_models
        model_data = sd_models.model_data
        if model_data.sd_model is not None:  # free the old model first, as forge_model_reload does
            model_data.sd_model = None
            memory_management.unload_all_models()
            memory_management.soft_empty_cache()
            gc.collect()
        model = forge_loader(state_dict)
        model.extra_generation_params, model.comments = {}, []
        model.sd_checkpoint_info, model.filename, model.sd_model_hash = info, info.filename, info.shorthash
        model_data.set_sd_model(model)
        script_callbacks.model_loaded_callback(model)
        # forge_model_reload() reloads from disk only when the loading parameters change: the merge
        # stays until the user picks another checkpoint.
        model_data.forge_hash = str(model_data.forge_loading_parameters)

    def _select(self, info) -> None:
        """Nothing to select: Forge's loading parameters still name the checkpoint the user picked,
        which is what it must load again once they change (never the merge's made-up file)."""

    def _recover(self, fallback: str) -> None:
        from modules import sd_models
        sd_models.model_data.forge_hash = ""  # forge_model_reload() then loads the selected file again

    def switch_to(self, title: str) -> str:
        from modules_forge import main_entry
        info = self._info(title)
        main_entry.checkpoint_change(info.title)
        return f"switched to {info.title} (Forge loads it at the next generation)"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a stubbed module without a spec
        return False


def detect_host() -> WebUIHost:
    """reForge has `ldm_patched` (and `modules_forge`); Forge has `backend`; else A1111."""
    if _has_module("ldm_patched"):
        return ReForgeHost()
    if _has_module("backend") and _has_module("modules_forge"):
        return ForgeHost()
    return WebUIHost()
