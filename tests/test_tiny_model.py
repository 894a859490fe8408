"""The shipped tiny base model (assets/tiny-qwen3): loads like any HF Qwen3 checkpoint and follows a rule
stated in its system prompt, greedily through our sampler."""

from pathlib import Path

import pytest

from fst_jax.models.hf import load_pretrained, load_tokenizer, render_chat
from fst_jax.tasks import synthetic as syn

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-qwen3"

# In-family rules (single steps and compositions the model was trained on) on fixed inputs.
CASES = [
    ("reverse", "planet"),
    ("sort", "banana"),
    ("upper", "jaxflax"),
    ("shift 1", "hello"),
    ("rotate 2", "abcdefg"),
    ("reverse, then upper", "qwerty"),
]


def test_assets_are_small_and_complete():
    names = {p.name for p in ASSETS.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024, f"{ASSETS} holds {total / 2**20:.1f} MiB, more than 10 MiB"


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from fst_jax.sampling import Sampler

    model = load_pretrained(ASSETS)
    tokenizer = load_tokenizer(ASSETS)
    return model, tokenizer, Sampler(nnx.split(model, nnx.Param))


def test_loads_as_a_tied_char_level_qwen3(tiny):
    model, tokenizer, _ = tiny
    c = model.config
    assert c.tie_word_embeddings and c.vocab_size == len(tokenizer)
    assert 500_000 < c.num_params() < 2_000_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 0
    assert tokenizer.decode(tokenizer("abc, then", add_special_tokens=False)["input_ids"]) == "abc, then"


def test_follows_a_rule_given_in_its_system_prompt(tiny):
    _, tokenizer, sampler = tiny
    prompts = [render_chat(tokenizer, [{"role": "system", "content": rule}, {"role": "user", "content": text}],
                           enable_thinking=False) for rule, text in CASES]
    out = sampler.generate(prompts, max_new_tokens=16, temperature=0.0, stop_token_ids=[tokenizer.eos_token_id],
                           pad_id=tokenizer.pad_token_id)
    got = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    assert all(out.finished)
    assert got == [syn.apply_rule(rule, text) for rule, text in CASES]
