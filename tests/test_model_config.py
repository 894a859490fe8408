"""Qwen3Config presets, HF config conversion, and the loader's errors on bad checkpoints."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fst_jax.runtime import parallel
from fst_jax.models.config import Qwen3Config
from fst_jax.models.hf import CheckpointError, load_pretrained, load_tokenizer, render_chat
from fst_jax.models.safetensors_io import SafetensorsError, SafetensorsFile, save_file

# Published config.json values of Qwen/Qwen3-{size} (hidden, intermediate, layers, heads, kv heads, tied).
PUBLISHED = {
    "0.6B": (1024, 3072, 28, 16, 8, True),
    "1.7B": (2048, 6144, 28, 16, 8, True),
    "4B": (2560, 9728, 36, 32, 8, True),
    "8B": (4096, 12288, 36, 32, 8, False),
    "14B": (5120, 17408, 40, 40, 8, False),
    "32B": (5120, 25600, 64, 64, 8, False),
}
APPROX_PARAMS_B = {"0.6B": 0.60, "1.7B": 1.72, "4B": 4.02, "8B": 8.19, "14B": 14.77, "32B": 32.76}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_presets_match_published_configs(size):
    c = Qwen3Config.preset(size)
    hidden, inter, layers, heads, kv, tied = PUBLISHED[size]
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.tie_word_embeddings) == (hidden, inter, layers, heads, kv, tied)
    assert (c.vocab_size, c.head_dim, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (
        151936, 128, 1_000_000.0, 1e-6, 40960)
    assert abs(c.num_params() / 1e9 - APPROX_PARAMS_B[size]) < 0.02
    assert Qwen3Config.preset(f"Qwen3-{size}") == c


def test_from_hf_reads_every_field(tmp_path):
    hf = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 99, "hidden_size": 40,
          "intermediate_size": 70, "num_hidden_layers": 3, "num_attention_heads": 5, "num_key_value_heads": 1,
          "head_dim": 12, "rope_theta": 5000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
          "max_position_embeddings": 777}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    c = Qwen3Config.from_hf(tmp_path)
    assert c == Qwen3Config(vocab_size=99, hidden_size=40, intermediate_size=70, num_layers=3, num_heads=5,
                            num_kv_heads=1, head_dim=12, rope_theta=5000.0, rms_norm_eps=1e-5,
                            tie_word_embeddings=True, max_position_embeddings=777)
    assert Qwen3Config.from_hf(c.to_hf_dict()) == c
    nested = dict(hf, rope_parameters={"rope_theta": 123.0, "rope_type": "default"})
    del nested["rope_theta"]
    assert Qwen3Config.from_hf(nested).rope_theta == 123.0


@pytest.mark.parametrize("change, message", [
    ({"num_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
    ({"head_dim": 7}, "even"),
    ({"hidden_size": 0}, "positive integer"),
    ({"remat": "sometimes"}, "remat"),
    ({"attention": "flash"}, "attention must be one of"),
    ({"dtype": "float8"}, "unknown dtype"),
])
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        Qwen3Config(**change)


def test_from_hf_rejects_other_architectures(tmp_path):
    with pytest.raises(ValueError, match="expected a dense Qwen3"):
        Qwen3Config.from_hf({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ValueError, match="lacks the field"):
        Qwen3Config.from_hf({"model_type": "qwen3", "hidden_size": 8})


@pytest.fixture
def checkpoint_copy(hf_checkpoints, tmp_path):
    src, _ = hf_checkpoints["untied"]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_files(tmp_path, checkpoint_copy):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    os.unlink(checkpoint_copy / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_pretrained(checkpoint_copy)
    os.unlink(checkpoint_copy / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(checkpoint_copy)


def test_truncated_safetensors(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors.*truncated"):
        load_pretrained(checkpoint_copy)
    path.write_bytes(data[:5])
    with pytest.raises(SafetensorsError, match="too short"):
        load_pretrained(checkpoint_copy)


def test_weights_not_matching_config(checkpoint_copy):
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=100)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*shape \(96, 64\).*config\.json implies \(100, 64\)"):
        load_pretrained(checkpoint_copy)
    (checkpoint_copy / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=4)))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.3\..*4 layers"):
        load_pretrained(checkpoint_copy)
    (checkpoint_copy / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    with pytest.raises(CheckpointError, match=r"unknown tensor.*model\.layers\.2\."):
        load_pretrained(checkpoint_copy)


def test_safetensors_round_trip_bf16(tmp_path):
    import ml_dtypes

    x = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    save_file({"x": x, "y": np.ones(3, np.int32)}, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert f.dtype("x") == x.dtype and f.shape("y") == (3,)
    np.testing.assert_array_equal(f.get("x")[1:, 2:], x[1:, 2:])


def test_mesh_not_matching_devices(hf_checkpoints):
    with pytest.raises(ValueError, match=r"needs 4 devices but 8 are available"):
        parallel.make_mesh({"fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"needs 2 devices but 8"):
        parallel.make_mesh({"fsdp": 2}, devices=jax.devices())


def test_tokenizer_chat_template(hf_checkpoints):
    path, _ = hf_checkpoints["tied"]
    tok = load_tokenizer(path)
    messages = [{"role": "system", "content": "Reverse it."}, {"role": "user", "content": "abc"}]
    ids = render_chat(tok, messages, enable_thinking=False)
    assert tok.decode(ids) == ("<|im_start|>system\nReverse it.<|im_end|>\n<|im_start|>user\nabc<|im_end|>\n"
                               "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(render_chat(tok, messages, enable_thinking=True)).endswith("<|im_start|>assistant\n")
    assert max(ids) < 128  # fits the tied parity model's vocab
