"""HF checkpoints ⇄ Flax Qwen3: load straight into shardings, save back in HF format, tokenizer and chat.

Loading never materialises the whole model anywhere: the model is built abstractly, every parameter gets its
`NamedSharding` from the logical-axis rules, and `jax.make_array_from_callback` asks for exactly the slice each
device holds, read from memory-mapped safetensors. A missing, unknown or wrong-shape key is an error that
names the key and the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from fst_jax.runtime import parallel
from fst_jax.models.config import Qwen3Config, canonical_dtype
from fst_jax.models.qwen3 import Qwen3
from fst_jax.models.safetensors_io import SafetensorsFile, save_file

from fst_jax.runtime.storage_errors import CheckpointError

__all__ = ["load_pretrained", "save_pretrained", "load_tokenizer", "render_chat", "CheckpointError"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class _Mapping:
    """One of our parameters and the HF tensor(s) it comes from."""

    path: tuple[str, ...]           # our State path
    hf_key: str                     # with {layer} for stacked layer params
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    stacked: bool


def _identity(x):
    return x


def _mappings(c: Qwen3Config) -> list[_Mapping]:
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

    def proj_in(heads):   # HF Linear [heads·H, D] ⇄ ours [D, heads, H]
        return (lambda w: w.T.reshape(D, heads, H), lambda w: w.reshape(D, heads * H).T)

    q_in, k_in = proj_in(N), proj_in(K)
    o_in = (lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T)
    transpose = (lambda w: w.T, lambda w: w.T)
    same = (_identity, _identity)
    per_layer = {
        "attn_norm": ("input_layernorm.weight", same),
        "q_proj": ("self_attn.q_proj.weight", q_in),
        "k_proj": ("self_attn.k_proj.weight", k_in),
        "v_proj": ("self_attn.v_proj.weight", k_in),
        "o_proj": ("self_attn.o_proj.weight", o_in),
        "q_norm": ("self_attn.q_norm.weight", same),
        "k_norm": ("self_attn.k_norm.weight", same),
        "mlp_norm": ("post_attention_layernorm.weight", same),
        "gate_proj": ("mlp.gate_proj.weight", transpose),
        "up_proj": ("mlp.up_proj.weight", transpose),
        "down_proj": ("mlp.down_proj.weight", transpose),
    }
    out = [_Mapping(("embed",), "model.embed_tokens.weight", *same, stacked=False),
           _Mapping(("final_norm",), "model.norm.weight", *same, stacked=False)]
    if not c.tie_word_embeddings:
        out.append(_Mapping(("lm_head",), "lm_head.weight", *transpose, stacked=False))
    for name, (suffix, (fwd, inv)) in per_layer.items():
        out.append(_Mapping(("layers", name), "model.layers.{layer}." + suffix, fwd, inv, stacked=True))
    return out


def _hf_shape(m: _Mapping, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    per_layer = our_shape[1:] if m.stacked else our_shape
    return m.to_hf(np.empty(per_layer, np.int8)).shape


def _open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Map every tensor key to the file holding it (single file or an index of shards)."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files: dict[str, SafetensorsFile] = {}
        located = {}
        for key, fname in weight_map.items():
            fpath = os.path.join(path, fname)
            if fname not in files:
                if not os.path.isfile(fpath):
                    raise CheckpointError(f"{index} lists {fname} (for {key!r}) but {fpath} does not exist")
                files[fname] = SafetensorsFile(fpath)
            if key not in files[fname].keys():
                raise CheckpointError(f"{index} says {key!r} is in {fpath}, but that file has no such tensor")
            located[key] = files[fname]
        return located
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {key: f for key in f.keys()}
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}: not a HF safetensors checkpoint")


def load_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None, mesh: Mesh | None = None,
                    rules: parallel.Rules = parallel.TRAIN_RULES, **config_overrides) -> Qwen3:
    """Load a local HF Qwen3 checkpoint (config.json + safetensors) into a Flax `Qwen3`.

    Each parameter is created directly in the sharding `rules` give on `mesh` (one device when no mesh):
    every device reads only its slice from the memory-mapped files. `dtype` is the compute dtype and
    `param_dtype` the stored one (default: both float32 on CPU, bfloat16 on accelerators).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist (download it first, e.g. "
                                f"`huggingface-cli download Qwen/Qwen3-8B --local-dir {path}`)")
    default = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    config = Qwen3Config.from_hf(path, dtype=canonical_dtype(dtype or default).name,
                                 param_dtype=canonical_dtype(param_dtype or dtype or default).name,
                                 **config_overrides)
    located = _open_checkpoint(path)
    mappings = _mappings(config)

    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = parallel.param_shardings(abstract_state, mesh, rules)
    else:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda v: v.replace(device), abstract_state, is_leaf=parallel._is_variable)
    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    flat_shardings = dict(nnx.to_flat_state(shardings))

    expected: set[str] = set()
    for m in mappings:
        keys = [m.hf_key.format(layer=i) for i in range(config.num_layers)] if m.stacked else [m.hf_key]
        want = _hf_shape(m, flat_abstract[m.path].shape)
        for key in keys:
            expected.add(key)
            if key not in located:
                where = os.path.join(path, INDEX_FILE if os.path.isfile(os.path.join(path, INDEX_FILE))
                                     else SINGLE_FILE)
                raise CheckpointError(f"missing tensor {key!r} in {where} (config.json describes "
                                      f"{config.num_layers} layers, tie_word_embeddings="
                                      f"{config.tie_word_embeddings})")
            got = located[key].shape(key)
            if got != want:
                raise CheckpointError(f"tensor {key!r} in {located[key].path} has shape {got}, but "
                                      f"{os.path.join(path, 'config.json')} implies {want}")
    if config.tie_word_embeddings:
        expected.add("lm_head.weight")  # some tied checkpoints keep a copy; it is the embedding, so unused
    unknown = sorted(k for k in located if k not in expected and not k.endswith(_IGNORED_SUFFIXES))
    if unknown:
        raise CheckpointError(f"unknown tensor(s) {unknown[:5]}{' …' if len(unknown) > 5 else ''} in "
                              f"{located[unknown[0]].path}: not part of a Qwen3 model with this config.json")

    loaded = {}
    for m in mappings:
        var = flat_abstract[m.path]
        sharding = flat_shardings[m.path].get_value()
        np_dtype = np.dtype(var.dtype)
        loaded[m.path] = var.replace(jax.make_array_from_callback(
            var.shape, sharding, _slice_reader(m, located, np_dtype, config.num_layers)))
    state = nnx.from_flat_state(loaded)
    return nnx.merge(graphdef, state)


def _slice_reader(m: _Mapping, located: dict[str, SafetensorsFile], np_dtype, num_layers: int):
    memo: dict[str, np.ndarray] = {}  # replicated shards ask for the same slice once per device

    def read(index: tuple[slice, ...]) -> np.ndarray:
        token = repr(index)
        if token not in memo:
            if m.stacked:
                layers = range(num_layers)[index[0]]
                parts = [m.to_ours(_tensor(located, m.hf_key.format(layer=i)))[index[1:]] for i in layers]
                memo[token] = np.stack(parts).astype(np_dtype)
            else:
                memo[token] = np.asarray(m.to_ours(_tensor(located, m.hf_key))[index], dtype=np_dtype)
        return memo[token]

    return read


def _tensor(located, key):
    return located[key].get(key)


def _host_value(x: jax.Array) -> np.ndarray:
    return parallel.to_host(x)


def save_pretrained(model: Qwen3, path: str | os.PathLike, *, dtype=None, tokenizer=None,
                    max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write `model` as a HF checkpoint transformers can load (config.json + safetensors, sharded with an
    index past `max_shard_bytes`), plus the tokenizer when given. Only process 0 writes."""
    path = os.fspath(path)
    config = model.config
    out_dtype = np.dtype(canonical_dtype(dtype or config.param_dtype))
    _, state = nnx.split(model, nnx.Param)
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    tensors: dict[str, np.ndarray] = {}
    for m in _mappings(config):
        value = _host_value(flat[m.path]).astype(out_dtype)
        if m.stacked:
            for i in range(config.num_layers):
                tensors[m.hf_key.format(layer=i)] = np.ascontiguousarray(m.to_hf(value[i]))
        else:
            tensors[m.hf_key] = np.ascontiguousarray(m.to_hf(value))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    hf_config = config.to_hf_dict() | {"torch_dtype": out_dtype.name, "dtype": out_dtype.name}
    _write_json(os.path.join(path, "config.json"), hf_config)
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE))
        stale = os.path.join(path, INDEX_FILE)
        if os.path.exists(stale):
            os.unlink(stale)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname))
            weight_map.update({key: fname for key in shard})
        total = sum(t.nbytes for t in tensors.values())
        _write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    return shards


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# tokenizer_config.json classes that are the plain `tokenizers`-backed tokenizer: loaded as such, without
# `AutoTokenizer`, whose import pulls in torch where it is installed (1.7 s of a run's start, against 0.5 s)
_PLAIN_TOKENIZERS = (None, "TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer (with its chat template), offline: `transformers.AutoTokenizer`, or the plain
    fast tokenizer when tokenizer_config.json names that class (or none) and tokenizer.json is there."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"missing {os.path.join(path, 'tokenizer.json')}: the checkpoint directory has no "
                                "tokenizer; copy the tokenizer files with the weights")
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) if os.path.isfile(config_path) else contextlib.nullcontext(None) as f:
        tokenizer_class = json.load(f).get("tokenizer_class") if f else None
    if tokenizer_class in _PLAIN_TOKENIZERS and os.path.isfile(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast as tokenizer_type
    else:
        from transformers import AutoTokenizer as tokenizer_type
    tokenizer = tokenizer_type.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer in {path} has no chat template (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja); fst_jax renders prompts as chats")
    return tokenizer


def render_chat(tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True,
                enable_thinking: bool | None = None) -> list[int]:
    """Token ids of `messages` ({role, content} with roles system/user/assistant) under the chat template.

    `enable_thinking` is passed through to templates that know it (Qwen3's); None leaves the template's default.
    """
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
