"""Qwen3 architecture configuration: presets for every dense size, and conversion from HF config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")
ATTENTION_KERNELS = ("auto", "xla", "dot_product", "cudnn")


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """`"bfloat16"`, `jnp.bfloat16`, `np.float32`... → a numpy dtype; a clear error for anything else."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Shape and numerics of a dense Qwen3 decoder.

    `head_dim` is independent of `hidden_size / num_heads` (Qwen3-0.6B: hidden 1024, 16 heads of 128).
    `dtype` is the computation dtype, `param_dtype` the storage dtype; RMSNorm, RoPE and softmax always run
    in float32. `remat` picks a `jax.checkpoint` policy for each decoder layer during training.
    `attention` picks the kernel for blocks of several queries (`fst_jax.models.attention`): "auto" (cuDNN's
    fused causal attention on a CUDA GPU for forwards without a KV cache on right-padded rows — the update, the
    KL evaluation — in bfloat16/float16 with head_dim a multiple of 8 up to 128; the einsums, softmax in
    float32, everywhere else: CPU, TPU, cached prefill, float32), "xla" (the einsums always), "cudnn" (cuDNN
    or a one-line error) or "dot_product" (`jax.nn.dot_product_attention`: cuDNN where "auto" would use it,
    else its XLA implementation). Single-token decode steps always use the einsums.
    """

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Qwen3Config.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Qwen3Config.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Qwen3Config.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"Qwen3Config.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        canonical_dtype(self.dtype)
        canonical_dtype(self.param_dtype)

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * h
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen3Config":
        """A published dense Qwen3 size: "0.6B", "1.7B", "4B", "8B", "14B" or "32B"."""
        key = name.upper().removeprefix("QWEN3-")
        if key not in PRESETS:
            raise ValueError(f"unknown Qwen3 preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict, **overrides) -> "Qwen3Config":
        """From a HF `config.json` (a checkpoint directory, the file itself, or its parsed dict)."""
        where = "config dict"
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}: expected a HF Qwen3 checkpoint directory")
            where = path
            with open(path) as f:
                try:
                    source = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON: {e}") from e
        arch = source.get("architectures") or []
        model_type = source.get("model_type")
        if model_type not in (None, "qwen3") or (arch and "Qwen3ForCausalLM" not in arch):
            raise ValueError(f"{where}: model_type={model_type!r}, architectures={arch}; expected a dense "
                             "Qwen3 (model_type 'qwen3', Qwen3ForCausalLM)")
        required = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                    "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
                    "num_attention_heads": "num_heads"}
        missing = [k for k in required if k not in source]
        if missing:
            raise ValueError(f"{where} lacks the field(s) {missing} needed for a Qwen3 config")
        if source.get("attention_bias"):
            raise ValueError(f"{where}: attention_bias=true is not a Qwen3 layout this port supports")
        rope = source.get("rope_theta")
        if rope is None:  # newer transformers nest it under rope_parameters
            rope = (source.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        kwargs = {ours: source[theirs] for theirs, ours in required.items()}
        kwargs.update(
            num_kv_heads=source.get("num_key_value_heads", source["num_attention_heads"]),
            head_dim=source.get("head_dim") or source["hidden_size"] // source["num_attention_heads"],
            rope_theta=float(rope),
            rms_norm_eps=float(source.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
            max_position_embeddings=source.get("max_position_embeddings", 40960),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' `Qwen3Config` reads back to this architecture."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "torch_dtype": self.param_dtype,
        }


# The published config.json values of the dense Qwen3 checkpoints (rope_theta 1e6 and eps 1e-6 for all).
PRESETS: dict[str, dict] = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                 tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                 tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
               tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
               tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40, num_kv_heads=8,
                tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8,
                tie_word_embeddings=False),
}
for _preset in PRESETS.values():
    _preset.update(vocab_size=151936, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                   max_position_embeddings=40960)
