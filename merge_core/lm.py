"""Language-model folders: family detection, vocabulary tensors, and the files a merged model needs.

Pure data and file logic (no transformers): it reads `config.json` as JSON and key names.

- **Family**: from `config.json` (`model_type`, else `architectures`) when the model comes with one,
  else from key patterns (qwen2's q/k/v biases, gemma2's pre-feedforward norms, gpt2's `c_attn`...).
  Llama and Mistral have the same keys: without a config they are one layout, "llama".
- **Vocabulary tensors** (`VOCAB_RULES`): the rows of input / output embeddings (and their biases) are
  tokens. Models with different vocabularies are merged on the rows they share; the rows beyond come
  from the model with the largest vocabulary (ties: the first), the same model for every such tensor.
- **Output files** (`output_files`): a folder output of model folders is a loadable model: config.json
  (first model's, `vocab_size` and the other fields the merge changed corrected), generation_config.json
  (first model's), the tokenizer files of the model whose vocabulary the output has. With
  --copy-extra-files the first model's other non-weight files come too, and a single-file output gets
  them beside it (an existing file there is never replaced: skipped and reported).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .errors import BadCheckpoint

# ------------------------------------------------------------------ families

# family -> (display name, key layout). The layout is what key patterns can tell; families with one
# layout (llama, mistral) are told apart only by their config.json.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("Llama", "llama"),
    "mistral": ("Mistral", "llama"),
    "gemma": ("Gemma", "llama"),
    "qwen2": ("Qwen2", "qwen2"),
    "qwen3": ("Qwen3", "qwen3"),
    "gemma2": ("Gemma 2", "gemma2"),
    "gemma3_text": ("Gemma 3", "gemma3_text"),
    "mixtral": ("Mixtral", "mixtral"),
    "phi": ("Phi", "phi"),
    "phi3": ("Phi-3", "phi3"),
    "gpt2": ("GPT-2", "gpt2"),
    "gpt_neox": ("GPT-NeoX", "gpt_neox"),
}
LM_FAMILIES = tuple(FAMILIES)

# config.json `architectures` entry -> family, for configs without a model_type.
_ARCHITECTURE_CLASSES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text", "MixtralForCausalLM": "mixtral", "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3", "GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "gpt_neox",
}

_LAYER = r"(?:^|\.)(?:layers|h)\.\d+\."
# Ordered: the first layout whose patterns all match some key wins. (pattern, ...) must all match.
KEY_LAYOUTS: tuple[tuple[str, tuple[re.Pattern, ...]], ...] = tuple((name, tuple(re.compile(p) for p in pats)) for name, pats in (
    ("gpt2", (_LAYER + r"attn\.c_attn\.weight$",)),
    ("gpt_neox", (_LAYER + r"attention\.query_key_value\.weight$",)),
    ("phi3", (_LAYER + r"self_attn\.qkv_proj\.weight$",)),
    ("phi", (_LAYER + r"self_attn\.dense\.weight$",)),
    ("mixtral", (_LAYER + r"block_sparse_moe\.",)),
    ("gemma3_text", (_LAYER + r"pre_feedforward_layernorm\.weight$", _LAYER + r"self_attn\.q_norm\.weight$")),
    ("gemma2", (_LAYER + r"pre_feedforward_layernorm\.weight$",)),
    ("qwen3", (_LAYER + r"self_attn\.q_norm\.weight$", _LAYER + r"mlp\.gate_proj\.weight$")),
    # qwen2: biases on q/k/v but none on o_proj (a Llama with attention_bias has all four)
    ("qwen2", (_LAYER + r"self_attn\.q_proj\.bias$", _LAYER + r"mlp\.gate_proj\.weight$")),  # (CLIP: fc1/fc2)
    ("llama", (_LAYER + r"self_attn\.q_proj\.weight$", _LAYER + r"mlp\.gate_proj\.weight$")),
))
_O_PROJ_BIAS = re.compile(_LAYER + r"self_attn\.o_proj\.bias$")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

# Vocabulary-sized tensors: (dim, pattern). Input embeddings, output embeddings / lm_head (tied or not)
# and their biases. Every such tensor takes its extra rows from the same model.
VOCAB_RULES: tuple[tuple[int, re.Pattern], ...] = (
    (0, re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|shared|tok_embeddings|embed_in)\.weight$")),
    (0, re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.(?:weight|bias)$")),
    (0, re.compile(r"^output\.(?:weight|bias)$")),  # Meta's original Llama layout
    (1, re.compile(r"(?:^|\.)final_logits_bias$")),
)
_INPUT_EMBEDDING = re.compile(VOCAB_RULES[0][1].pattern)


def display_name(family: str) -> str:
    return FAMILIES.get(family, (family, family))[0]


def layout_of(family: str) -> str:
    return FAMILIES.get(family, (family, family))[1]


def _shape(spec) -> tuple[int, ...]:
    return tuple(spec.shape) if hasattr(spec, "shape") else tuple(spec)


def detect_layout(specs: Mapping) -> str | None:
    """The LM key layout of a state dict ("llama", "qwen2", "gpt2", ...), or None."""
    keys = list(specs)
    for name, patterns in KEY_LAYOUTS:
        if all(any(p.search(k) for k in keys) for p in patterns):
            if name == "qwen2" and any(_O_PROJ_BIAS.search(k) for k in keys):
                return "llama"  # Llama with attention_bias=True
            return name
    return None


def vocab_dim(key: str) -> int | None:
    """The dimension along which `key` is vocabulary-sized, or None."""
    for dim, pattern in VOCAB_RULES:
        if pattern.search(key):
            return dim
    return None


def shape_facts(specs: Mapping) -> tuple[int | None, int | None]:
    """(hidden size, layer count) from the tensors: the input embedding's width, distinct layer indices."""
    hidden = None
    for key, spec in specs.items():
        if _INPUT_EMBEDDING.search(key) and len(_shape(spec)) == 2:
            hidden = _shape(spec)[1]
            break
    layers = {m.group(1) for k in specs for m in [_LAYER_INDEX.search(k)] if m}
    return hidden, (len(layers) or None)


# ------------------------------------------------------------------ folders and configs

HF_WEIGHT_FILE = re.compile(r"^(?:model|pytorch_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


def model_folder(path) -> Path | None:
    """The folder whose config/tokenizer belong to the model at `path`: the folder itself, or the folder of
    an HF weights file (model.safetensors, pytorch_model.bin, shards), or of the only checkpoint beside a
    config.json. A bare file among others has no folder of its own (None)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return p
    parent = p.parent
    if not (parent / "config.json").is_file():
        return None
    if HF_WEIGHT_FILE.match(p.name):
        return parent
    try:
        weights = [f for f in parent.iterdir() if f.suffix.lower() in WEIGHT_SUFFIXES and f.is_file()]
    except OSError:
        return None
    return parent if weights == [p] or [f.name for f in weights] == [p.name] else None


def read_config(folder: Path | None) -> dict | None:
    """config.json of a model folder as a dict (None if there is none); a broken one is an error."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadCheckpoint(f"{path}: unreadable config.json ({detail})") from None
    if not isinstance(data, dict):
        raise BadCheckpoint(f"{path}: config.json is not a JSON object")
    return data


def _text_config(config: dict) -> dict:
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def family_from_config(config: dict | None) -> str | None:
    if not config:
        return None
    cfg = _text_config(config)
    model_type = cfg.get("model_type") or config.get("model_type")
    if isinstance(model_type, str) and model_type:
        return model_type
    for arch in config.get("architectures") or ():
        if arch in _ARCHITECTURE_CLASSES:
            return _ARCHITECTURE_CLASSES[arch]
    return None


@dataclass
class LMInfo:
    """What a source is as a language model. `family` comes from config.json when there is one."""
    family: str
    source: str                      # "config.json" or "keys"
    layout: str | None               # from the keys
    folder: Path | None
    config: dict | None = None
    hidden: int | None = None
    layers: int | None = None
    vocab: int | None = None         # rows of the vocabulary tensors (the largest)

    @property
    def display(self) -> str:
        return display_name(self.family)

    def describe(self) -> dict:
        return {"family": self.family, "display": self.display, "detected_from": self.source,
                "model_type": (self.config or {}).get("model_type"), "hidden_size": self.hidden,
                "layers": self.layers, "vocab_rows": self.vocab,
                "config_vocab_size": _text_config(self.config).get("vocab_size") if self.config else None}


def lm_info(path, specs: Mapping) -> LMInfo | None:
    """The LM description of a model (its path and its key specs), or None if it is not a known LM."""
    folder = model_folder(path)
    config = read_config(folder)
    layout = detect_layout(specs)
    family = family_from_config(config)
    if family is None and layout is None:
        return None
    hidden, layers = shape_facts(specs)
    if config is not None:
        cfg = _text_config(config)
        hidden = hidden or cfg.get("hidden_size") or cfg.get("n_embd")
        layers = layers or cfg.get("num_hidden_layers") or cfg.get("n_layer")
    rows = [_shape(s)[d] for k, s in specs.items() for d in [vocab_dim(k)] if d is not None and len(_shape(s)) > d]
    return LMInfo(family=family or layout, source="config.json" if family else "keys", layout=layout,
                  folder=folder, config=config, hidden=hidden, layers=layers, vocab=max(rows) if rows else None)


def compatible(a: LMInfo, b: LMInfo) -> bool:
    """Same family: both configs name the same model_type; a config-less model matches by key layout."""
    if a.source == "config.json" and b.source == "config.json":
        return a.family == b.family
    la = a.layout or layout_of(a.family)
    lb = b.layout or layout_of(b.family)
    return la == lb


# ------------------------------------------------------------------ output files

@dataclass
class ExtraFile:
    """One non-weight file for the output: copied from `source`, or written from `data`."""
    name: str
    origin: str                      # the input model it comes from
    source: Path | None = None
    data: bytes | None = None
    note: str = ""

    def describe(self) -> dict:
        return {"file": self.name, "from": self.origin, **({"note": self.note} if self.note else {})}


@dataclass
class OutputFiles:
    files: list[ExtraFile] = field(default_factory=list)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def corrected_config(config: dict, vocab: int | None, has_lm_head: bool | None, dtype: str) -> tuple[dict, list[str]]:
    """The first model's config with the fields the merge changed set to the output's; and what changed."""
    out = json.loads(json.dumps(config))
    target = _text_config(out)
    changes = []
    if vocab is not None and target.get("vocab_size") != vocab:
        changes.append(f"vocab_size {target.get('vocab_size')} -> {vocab}")
        target["vocab_size"] = vocab
    if has_lm_head is not None:
        tied = bool(target.get("tie_word_embeddings", out.get("tie_word_embeddings", False)))
        if tied and has_lm_head:
            changes.append("tie_word_embeddings true -> false (the output has its own lm_head)")
            target["tie_word_embeddings"] = False
        elif not tied and not has_lm_head:
            changes.append("tie_word_embeddings false -> true (the output has no lm_head)")
            target["tie_word_embeddings"] = True
    if dtype in _DTYPE_NAMES:
        for name in ("torch_dtype", "dtype"):
            if name in out and out[name] != _DTYPE_NAMES[dtype]:
                changes.append(f"{name} {out[name]} -> {_DTYPE_NAMES[dtype]}")
                out[name] = _DTYPE_NAMES[dtype]
    return out, changes


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / n).is_file() for n in TOKENIZER_FILES)


def folder_files(folder: Path, origin: str) -> list[ExtraFile]:
    """A folder's non-weight files (configs, tokenizer, README...), never its shard index, nothing hidden."""
    out = []
    for item in sorted(folder.iterdir()):
        if (item.name.startswith(".") or not item.is_file() or item.suffix.lower() in WEIGHT_SUFFIXES
                or item.name.endswith(".index.json")):
            continue
        out.append(ExtraFile(item.name, origin, source=item))
    return out


def output_files(names: Sequence[str], paths: Sequence, infos: Sequence[LMInfo | None], *, output: Path | None,
                 copy_all: bool, vocab_from: int | None, vocab_rows: int | None, has_lm_head: bool | None,
                 dtype: str = "auto") -> OutputFiles | None:
    """The non-weight files the output gets, or None for none.

    A folder output of model folders always gets config.json, generation_config.json and the tokenizer
    (it must be loadable as a model); `copy_all` (--copy-extra-files) adds the first model's other
    non-weight files, and gives a single-file output the same files beside it."""
    if output is None:
        return None
    is_folder = output.suffix.lower() != ".safetensors"
    folders = [info.folder if info is not None else model_folder(p) for info, p in zip(infos, paths)]
    lm_folders = [f if f is not None and (f / "config.json").is_file() else None for f in folders]
    if not copy_all and not (is_folder and any(lm_folders)):
        return None
    files: list[ExtraFile] = []
    taken: set[str] = set()

    def add(entry: ExtraFile) -> None:
        if entry.name not in taken:
            taken.add(entry.name)
            files.append(entry)

    cfg_index = next((i for i, f in enumerate(lm_folders) if f is not None), None)
    if cfg_index is not None:
        folder = lm_folders[cfg_index]
        config = (infos[cfg_index].config if infos[cfg_index] is not None else None) or read_config(folder)
        known = infos[0] is not None and infos[0].family in FAMILIES  # tie flag: causal LMs we know only
        fixed, changes = corrected_config(config, vocab_rows, has_lm_head if known else None, dtype)
        note = "; ".join(changes) + ("; " if changes else "") if cfg_index == 0 else \
            f"{'; '.join(changes) + '; ' if changes else ''}the first model has no config.json; "
        add(ExtraFile("config.json", names[cfg_index], source=folder / "config.json",
                      data=(json.dumps(fixed, indent=2) + "\n").encode(), note=note.rstrip("; ")))
        if (folder / "generation_config.json").is_file():
            add(ExtraFile("generation_config.json", names[cfg_index], source=folder / "generation_config.json"))
        # The tokenizer goes with the vocabulary: the model the extra rows come from (else the first).
        wanted = vocab_from if vocab_from is not None else 0
        order = [wanted] + [i for i in range(len(folders)) if i != wanted]
        tok_index = next((i for i in order if _has_tokenizer(folders[i])), None)
        if tok_index is not None:
            note = "" if tok_index == wanted else f"{names[wanted]} has no tokenizer files"
            for name in TOKENIZER_FILES:
                if (folders[tok_index] / name).is_file():
                    add(ExtraFile(name, names[tok_index], source=folders[tok_index] / name, note=note))
    if copy_all:
        first = folders[0] or (Path(paths[0]).parent if paths[0] is not None and Path(paths[0]).is_file() else None)
        if first is not None:
            tokenizer_taken = any(f.name in TOKENIZER_FILES for f in files)
            for entry in folder_files(first, names[0]):
                if tokenizer_taken and entry.name in TOKENIZER_FILES:
                    continue  # never mix two models' tokenizer files
                add(entry)
    return OutputFiles(files) if files else None
