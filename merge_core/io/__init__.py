"""Reading and writing checkpoints one tensor at a time."""
from .hashing import file_sha256, sha256_short
from .safetensors_file import SafetensorsReader, SafetensorsWriter, save_safetensors
from .sources import (ModelSource, SafetensorsSource, ShardedSource, StateDictSource, expand_model_args,
                      load_pickled_state_dict, open_model)
from .spec import TensorSpec

__all__ = ["ModelSource", "SafetensorsReader", "SafetensorsSource", "SafetensorsWriter", "ShardedSource",
           "StateDictSource", "TensorSpec", "expand_model_args", "file_sha256", "load_pickled_state_dict",
           "open_model", "save_safetensors", "sha256_short"]
