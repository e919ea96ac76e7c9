"""Language-model folders: mismatched vocabularies, loadable folder outputs, families, CLI forms.

Tiny models are built offline with transformers from a config (no hub), with a tokenizer built by
`tokenizers`; transformers is a dev requirement (requirements-dev.txt)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import merge_core.methods as M
from merge_core.cli import main
from merge_core.engine import merge
from merge_core.errors import ArchitectureMismatch, ShapeMismatch
from merge_core.inspect import inspect_model
from merge_core.io import save_safetensors

from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers  # noqa: E402

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
ADDED = ["<tool>", "<think>"]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _tokenizer(added=()):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, 1000)}}
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if added:
        fast.add_tokens(list(added))
    return fast


def _build(folder, model_cls, config, seed, vocab=1000, added=(), shard=None, as_bin=False):
    torch.manual_seed(seed)
    model = model_cls(config)
    if vocab != config.vocab_size:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():  # distinct, non-trivial extra rows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if as_bin:  # a plain torch.save state dict, as older checkpoints ship
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        state = {k: v for k, v in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
    elif shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    _tokenizer(added).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    llama = lambda: LlamaConfig(vocab_size=1000, **SMALL)  # noqa: E731
    qwen = lambda: Qwen2Config(vocab_size=1000, tie_word_embeddings=True, **SMALL)  # noqa: E731
    return {
        "a": _build(root / "llama_a", LlamaForCausalLM, llama(), 0),
        "b": _build(root / "llama_b", LlamaForCausalLM, llama(), 1, vocab=1002, added=ADDED, shard="40KB"),
        "c": _build(root / "llama_c", LlamaForCausalLM, llama(), 2, as_bin=True),
        "qa": _build(root / "qwen_a", Qwen2ForCausalLM, qwen(), 3),
        "qb": _build(root / "qwen_b", Qwen2ForCausalLM, qwen(), 4, vocab=1002, added=ADDED),
        "m": _build(root / "mistral", MistralForCausalLM, MistralConfig(vocab_size=1000, **SMALL), 5),
        "wide": _build(root / "llama_wide", LlamaForCausalLM,
                       LlamaConfig(vocab_size=1000, **{**SMALL, "hidden_size": 64}), 6),
        "deep": _build(root / "llama_deep", LlamaForCausalLM,
                       LlamaConfig(vocab_size=1000, **{**SMALL, "num_hidden_layers": 3}), 7),
    }


def _weights(folder):
    folder = str(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load_checked(out):
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (kind, info[kind])
    return model


def _generates(model, out):
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(ADDED) == [1000, 1001]
    ids = tok("w5 w6 <tool> w7 <think>", return_tensors="pt")["input_ids"]
    assert 1000 in ids[0].tolist() and 1001 in ids[0].tolist()
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape[-1] == 1002 and torch.isfinite(logits).all()
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=3)
    assert gen.shape[1] == ids.shape[1] + 4


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_slerp_of_mismatched_vocabularies_is_a_loadable_model(lms, tmp_path, capsys):
    out = tmp_path / "slerp_out"
    assert main(["merge", "--models", str(lms["a"]), str(lms["b"]), "--method", "slerp", "--t", "0.3",
                 "--output", str(out), "--no-hash"]) == 0
    printed = capsys.readouterr().out
    model = _load_checked(out)
    assert model.config.vocab_size == 1002
    a, b, got = _weights(lms["a"]), _weights(lms["b"]), model.state_dict()
    for key in (EMBED, HEAD):
        shared = M.slerp(a[key], b[key][:1000], 0.3)  # the method on the shared block only
        assert _rel(got[key][:1000], shared) < 1e-6
        assert torch.equal(got[key][1000:], b[key][1000:])  # kept from the larger model, never padded
    layer = "model.layers.1.mlp.down_proj.weight"
    assert _rel(got[layer], M.slerp(a[layer], b[layer], 0.3)) < 1e-6
    _generates(model, out)
    # the summary names each copied file's origin; the tokenizer is the one with the added tokens
    assert "copied config.json from llama_a (vocab_size 1000 -> 1002)" in printed
    assert "copied tokenizer.json from llama_b" in printed
    manifest = json.loads((out / ".manifold-merge.json").read_text())["files"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(manifest)
    assert not (out / "model.safetensors.index.json").exists() or "model.safetensors.index.json" in manifest


def test_karcher_of_safetensors_sharded_and_bin_folders(lms, tmp_path):
    out = tmp_path / "karcher_out"
    # b (the larger vocabulary, sharded) in the middle: the extra rows come from it, not from the first
    result = merge([lms["a"], lms["b"], lms["c"]], "karcher", output=out, hash_inputs=False,
                   max_shard_bytes=60_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    model = _load_checked(out)
    assert model.config.vocab_size == 1002
    ws = [_weights(lms[k]) for k in "abc"]
    got = model.state_dict()
    for key in (EMBED, HEAD):
        shared = M.karcher_mean_direct([w[key][:1000] for w in ws], compute_dtype=torch.float64)
        assert _rel(got[key][:1000], shared) < 1e-5
        assert torch.equal(got[key][1000:], ws[1][key][1000:])
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert _rel(got[layer], M.karcher_mean_direct([w[layer] for w in ws], compute_dtype=torch.float64)) < 1e-5
    _generates(model, out)
    origins = {e["file"]: e["from"] for e in result.summary["extra_files"]}
    assert origins["config.json"] == "llama_a" and origins["tokenizer.json"] == "llama_b"
    assert result.summary["architectures"] == ["llama"] * 3


def test_tied_qwen2_embeddings(lms, tmp_path):
    out = tmp_path / "qwen_out"
    assert main(["merge", "--models", str(lms["qa"]), str(lms["qb"]), "--method", "karcher", "--alphas", "1", "3",
                 "--output", str(out), "-q"]) == 0
    model = _load_checked(out)
    assert model.config.vocab_size == 1002 and model.config.tie_word_embeddings
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    a, b, got = _weights(lms["qa"]), _weights(lms["qb"]), model.state_dict()
    shared = M.karcher_mean_direct([a[EMBED], b[EMBED][:1000]], [1, 3], compute_dtype=torch.float64)
    assert _rel(got[EMBED][:1000], shared) < 1e-5
    assert torch.equal(got[EMBED][1000:], b[EMBED][1000:])
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    _generates(model, out)


def _bare(folder, dest):
    shutil.copy(folder / "model.safetensors", dest)
    return dest


@pytest.mark.parametrize("pair", [("a", "qa"), ("a", "m")])
def test_different_families_are_refused_before_writing(lms, tmp_path, capsys, pair):
    out = tmp_path / "refused"
    assert main(["merge", "--models", str(lms[pair[0]]), str(lms[pair[1]]), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot merge different architectures" in err
    assert lms[pair[0]].name in err and lms[pair[1]].name in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bare_files_are_told_apart_by_their_keys(lms, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    llama = _bare(lms["a"], bare / "llama.safetensors")
    qwen = _bare(lms["qa"], bare / "qwen.safetensors")
    assert inspect_model(llama, with_hash=False)["architecture"] == "llama"
    assert inspect_model(qwen, with_hash=False)["architecture"] == "qwen2"
    with pytest.raises(ArchitectureMismatch, match=r"llama\.safetensors: Llama \(from its keys\); "
                                                   r"qwen\.safetensors: Qwen2 \(from its keys\)"):
        merge([llama, qwen], "sma", output=tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    # a bare Llama-layout file and a Mistral folder share one key layout: allowed
    merge([llama, lms["m"]], "sma", output=tmp_path / "lm.safetensors")


def test_inspect_shows_the_family(lms, capsys):
    assert main(["inspect", "--no-hash", str(lms["m"]), str(lms["qb"])]) == 0
    out = capsys.readouterr().out
    assert "LM family    : Mistral (mistral, from config.json)" in out
    assert "LM family    : Qwen2 (qwen2, from config.json); hidden 32, 2 layers, vocabulary 1002 rows" in out
    assert inspect_model(lms["c"], with_hash=False)["architecture"] == "llama"  # pytorch_model.bin


@pytest.mark.parametrize("other,what", [("wide", "hidden sizes (32 and 64)"), ("deep", "layer counts (2 and 3)")])
def test_different_sizes_are_refused_naming_both_files(lms, tmp_path, capsys, other, what):
    out = tmp_path / "o"
    assert main(["merge", "--models", str(lms["a"]), str(lms[other]), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err and "llama_a" in err and lms[other].name in err
    assert not out.exists()


def test_the_extra_rows_come_from_one_model(write, tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {EMBED: torch.randn(1002, 8, generator=g), HEAD: torch.randn(1000, 8, generator=g)}
    b = {EMBED: torch.randn(1000, 8, generator=g), HEAD: torch.randn(1001, 8, generator=g)}
    with pytest.raises(ShapeMismatch, match=r"lm_head\.weight.*b\.safetensors has 1001.*a\.safetensors"):
        merge([write("a.safetensors", a), write("b.safetensors", b)], "sma", output=tmp_path / "o.safetensors")
    # biases of the output embedding follow the same model; a tie goes to the first
    c = {EMBED: torch.randn(1000, 8, generator=g), "lm_head.bias": torch.randn(1000, generator=g)}
    d = {EMBED: torch.randn(1003, 8, generator=g), "lm_head.bias": torch.randn(1003, generator=g)}
    res = merge([write("c.safetensors", c), write("d.safetensors", d)], "sma", dtype="fp32")
    assert torch.equal(res.state_dict["lm_head.bias"][1000:], d["lm_head.bias"][1000:])
    assert torch.allclose(res.state_dict["lm_head.bias"][:1000], (c["lm_head.bias"] + d["lm_head.bias"][:1000]) / 2)


def _tiny_lm(seed, base, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items() if v.shape[0] <= vocab}


def test_karcher_of_100_small_language_models(tmp_path):
    g = torch.Generator().manual_seed(123)
    base = {EMBED: torch.randn(50, 8, generator=g), HEAD: torch.randn(50, 8, generator=g),
            "model.norm.weight": torch.ones(8),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.layers.0.mlp.gate_proj.weight": torch.randn(16, 8, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=g)}
    folder = tmp_path / "hundred"
    folder.mkdir()
    sds = []
    for i in range(100):
        sd = _tiny_lm(i, base)
        save_safetensors(folder / f"lm_{i + 1}.safetensors", sd)
        sds.append(sd)
    out = tmp_path / "k100.safetensors"
    assert main(["merge", "--models", str(folder), "--method", "karcher", "--precision", "fp64", "--dtype", "fp32",
                 "--output", str(out), "--no-hash", "-q"]) == 0
    got = load_file(out)
    for key in base:
        want = M.karcher_mean_direct([sd[key] for sd in sds], compute_dtype=torch.float64)
        assert _rel(got[key], want) < 1e-6, key


def test_copy_extra_files_beside_a_single_file_output(lms, tmp_path, capsys):
    out_dir = tmp_path / "single"
    out_dir.mkdir()
    (out_dir / "config.json").write_text("keep me")
    out = out_dir / "merged.safetensors"
    assert main(["merge", "--models", str(lms["a"]), str(lms["b"]), "--method", "sma", "--output", str(out),
                 "--copy-extra-files", "--no-hash"]) == 0
    printed = capsys.readouterr().out
    assert (out_dir / "config.json").read_text() == "keep me"  # never overwritten
    assert "not copied: config.json" in printed
    assert (out_dir / "tokenizer.json").read_bytes() == (lms["b"] / "tokenizer.json").read_bytes()
    assert "copied tokenizer.json from llama_b" in printed
    assert not (out_dir / "model.safetensors.index.json").exists()
    # without the flag a single-file output gets nothing beside it
    other = tmp_path / "plain"
    other.mkdir()
    merge([lms["a"], lms["b"]], "sma", output=other / "m.safetensors")
    assert [p.name for p in other.iterdir()] == ["m.safetensors"]


def test_folder_output_with_copy_extra_files_adds_the_first_models_other_files(lms, tmp_path):
    (lms["a"] / "README.md").write_text("model card")
    try:
        out = tmp_path / "full"
        result = merge([lms["a"], lms["b"]], "slerp", output=out, copy_extra_files=True, dtype="bf16")
    finally:
        (lms["a"] / "README.md").unlink()
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= names
    assert not any(n.endswith(".index.json") for n in names)
    manifest = set(json.loads((out / ".manifold-merge.json").read_text())["files"])
    assert manifest == names - {".manifold-merge.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 1002 and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert {e["file"] for e in result.summary["extra_files"]} == names - {".manifold-merge.json", "model.safetensors"}


def _small_dir(tmp_path, n=3):
    folder = tmp_path / "models"
    folder.mkdir()
    sds = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sd = {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
        save_safetensors(folder / f"m{i + 1}.safetensors", sd)
        sds.append(sd)
    return folder, sds


def test_positional_form_defaults_to_sma(tmp_path):
    folder, sds = _small_dir(tmp_path)
    out = tmp_path / "sma.safetensors"
    assert main(["merge", str(folder), str(out), "-q"]) == 0
    got = load_file(out)
    assert torch.allclose(got["w"], sum(sd["w"] for sd in sds) / 3, atol=1e-6)
    assert json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["manifold_merge_recipe"])[
        "method"] == "sma"
    out2 = tmp_path / "ema.safetensors"
    assert main(["merge", str(folder), str(out2), "--method", "ema", "--alpha", "0.7", "-q"]) == 0
    c = M.ema_coefficients(3, 0.7)
    assert torch.allclose(load_file(out2)["w"], sum(ci * sd["w"] for ci, sd in zip(c, sds)), atol=1e-6)
    out3 = tmp_path / "k.safetensors"  # the --models form keeps karcher as its default
    assert main(["merge", "--models", str(folder), "--output", str(out3), "-q"]) == 0
    assert json.loads(__import__("safetensors").safe_open(str(out3), "pt").metadata()["manifold_merge_recipe"])[
        "method"] == "karcher"


@pytest.mark.parametrize("argv,message", [
    (["{d}", "{o}", "--models", "{d}"], "give the inputs one way"),
    (["{d}"], "the positional form is INPUT_DIR OUTPUT"),
    (["--models", "{d}"], "--output is missing"),
    (["--output", "{o}"], "--models is missing"),
    (["{o}", "{o}"], "INPUT_DIR must be a folder"),
])
def test_one_form_or_the_other(tmp_path, capsys, argv, message):
    folder, _ = _small_dir(tmp_path)
    out = tmp_path / "x.safetensors"
    assert main(["merge"] + [a.format(d=folder, o=out) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_help_names_both_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "INPUT_DIR OUTPUT" in text and "default method sma" in text and "default karcher" in text


def test_sharded_pytorch_model_bin_input(lms, tmp_path):
    """Sharded `pytorch_model-*.bin` with an index (plain torch.save shards) merges like any folder."""
    folder = tmp_path / "llama_bin_shards"
    folder.mkdir()
    state = torch.load(lms["c"] / "pytorch_model.bin", weights_only=True)
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, folder / name)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (lms["c"] / name).exists():
            shutil.copy(lms["c"] / name, folder / name)
    out = tmp_path / "from_bin"
    result = merge([folder, lms["b"]], "sma", output=out)
    assert result.architecture == "llama"
    assert not any(p.name.endswith(".bin") or p.name == "pytorch_model.bin.index.json" for p in out.iterdir())
    model = _load_checked(out)
    got = model.state_dict()
    b = _weights(lms["b"])
    assert torch.allclose(got[EMBED][:1000], (state[EMBED] + b[EMBED][:1000]) / 2, atol=1e-6)
    assert torch.equal(got[HEAD][1000:], b[HEAD][1000:])
    _generates(model, out)


def test_key_layouts_without_a_config():
    from merge_core.arch import detect_architecture
    layer = "model.layers.0."
    llama = {layer + "self_attn.q_proj.weight": (8, 8), layer + "mlp.gate_proj.weight": (16, 8), EMBED: (50, 8)}
    assert detect_architecture(llama) == "llama"
    assert detect_architecture({**llama, layer + "self_attn.q_proj.bias": (8,)}) == "qwen2"
    assert detect_architecture({**llama, layer + "self_attn.q_proj.bias": (8,), layer + "self_attn.o_proj.bias": (8,)}) \
        == "llama"  # a Llama with attention_bias has all four biases
    assert detect_architecture({**llama, layer + "pre_feedforward_layernorm.weight": (8,)}) == "gemma2"
    assert detect_architecture({"transformer.h.0.attn.c_attn.weight": (8, 24), "transformer.wte.weight": (50, 8)}) == "gpt2"
    assert detect_architecture({layer + "self_attn.qkv_proj.weight": (24, 8), layer + "mlp.gate_up_proj.weight": (32, 8)}) == "phi3"
    # a CLIP text encoder has q_proj biases too, but fc1/fc2 instead of gate_proj: not a language model
    clip = {f"text_model.encoder.layers.0.{k}": (8,) for k in ("self_attn.q_proj.bias", "self_attn.q_proj.weight",
                                                                "mlp.fc1.weight", "mlp.fc2.weight")}
    from merge_core.lm import detect_layout
    assert detect_layout(clip) is None and detect_architecture(clip) == "unknown"


def test_broken_config_is_a_one_line_error_and_force_overrides_the_family_check(lms, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(lms["a"], broken)
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "o"
    assert main(["merge", "--models", str(broken), str(lms["b"]), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken/config.json: unreadable config.json" in err
    assert not out.exists()
    # --force: a Llama and a Mistral merge on their shared keys (the first model's config)
    result = merge([lms["a"], lms["m"]], "sma", output=tmp_path / "forced", force=True)
    assert result.summary["architectures"] == ["llama", "mistral"]
    assert json.loads((tmp_path / "forced" / "config.json").read_text())["model_type"] == "llama"
