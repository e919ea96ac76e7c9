"""Checkpoint list and model loading with A1111 1.10's names; loading is recorded, not done."""
import hashlib
import os
from types import SimpleNamespace

from modules import calls, paths, shared

model_path = None  # tests set it (A1111: <models>/Stable-diffusion)
checkpoints_list: dict = {}
checkpoint_aliases: dict = {}
SUFFIXES = (".safetensors", ".ckpt")


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        root = shared.cmd_opts.ckpt_dir or model_path
        self.name = os.path.relpath(filename, root).replace("\\", "/")
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name)[0]
        self.hash = None
        self.sha256 = hashlib.sha256(filename.encode()).hexdigest()  # stand-in: of the path, not the file
        self.shorthash = self.sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        self.ids = [self.name, self.model_name, self.title]

    def calculate_shorthash(self):
        # as A1111 1.10: hash the file (here: its path) and register under the new ids
        self.sha256 = hashlib.sha256(self.filename.encode()).hexdigest()
        self.shorthash = self.sha256[:10]
        self.register()
        return self.shorthash

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self


class ModelData:
    def __init__(self):
        self.sd_model = None
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def set_sd_model(self, model):
        self.sd_model = model


model_data = ModelData()


def list_models():
    calls.append(("list_models",))
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    root = shared.cmd_opts.ckpt_dir or model_path
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if f.endswith(SUFFIXES):
                info = CheckpointInfo(os.path.join(dirpath, f))
                checkpoints_list[info.title] = info
                for i in info.ids:
                    checkpoint_aliases[i] = info


def checkpoint_tiles(use_short=False):
    return sorted(checkpoints_list, key=str.lower)


def get_closet_checkpoint_match(search_string):
    if search_string in checkpoint_aliases:
        return checkpoint_aliases[search_string]
    found = sorted((i for i in checkpoints_list.values() if search_string in i.title), key=lambda i: len(i.title))
    return found[0] if found else None


def _is_loaded(info):
    model = model_data.sd_model
    return model is not None and getattr(model, "sd_checkpoint_info", None) is not None \
        and model.sd_checkpoint_info.filename == info.filename


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    if _is_loaded(checkpoint_info):  # as reForge: the same file is loaded already -> nothing happens
        return model_data.sd_model
    calls.append(("load_model", checkpoint_info, already_loaded_state_dict))
    checkpoint_info.calculate_shorthash()  # load_model_weights does this
    model_data.sd_model = SimpleNamespace(sd_checkpoint_info=checkpoint_info, state_dict=already_loaded_state_dict)
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    return model_data.sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    if _is_loaded(info) and not forced_reload:  # as A1111: same file -> keep the model
        return model_data.sd_model
    calls.append(("reload_model_weights", info))
    model_data.sd_model = SimpleNamespace(sd_checkpoint_info=info, state_dict=None)
    return model_data.sd_model
