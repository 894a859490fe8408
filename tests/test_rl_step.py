"""The slow-weight step: config and optimizer, the jitted update (against a from-scratch reference, across
micro-batch sizes and meshes, NaN safety, memory with chunked log-probs) and the coupled fst_step (prompt
assignment, bad inputs, a learning run)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from fst_jax.runtime import parallel
from fst_jax.models.char_tokenizer import make_char_tokenizer
from fst_jax.models.qwen3 import Qwen3, Qwen3Config
from fst_jax.rl import config as rl_config_lib, policy_update as rl_update
from fst_jax.rl.rollouts import build_rollouts, length_bucket, pad_rows
from fst_jax.rl import RLConfig, TrainState, compute_gradients, fst_step, make_optimizer, update
from fst_jax.sampling import SampleOutput

TOKENIZER = make_char_tokenizer()
TINY = Qwen3Config(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                   num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, base_params): a tiny random Qwen3 and a slightly different 'base' copy."""
    # Initialised with numpy like Qwen3 does (N(0, 0.02²) weights, unit norms): jax.random would compile
    # seconds of threefry code on CPU for a few kilobytes of weights.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(TINY, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.RandomState(0)
    init = lambda path, x: (np.ones(x.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
                            else 0.02 * rng.randn(*x.shape).astype(np.float32))
    params = jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(init, abstract))
    base = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.randn(*x.shape), jnp.float32), params)
    return graphdef, params, base


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _reference_logprobs(graphdef, params, rollouts, temperature):
    """log π(y_t | y<t) of each token from full logits (position t scores token t; 0 at t = 0), entropies."""
    logits_btv = nnx.merge(graphdef, params)(rollouts.input_ids, attention_mask=rollouts.attention_mask)
    log_probs_btv = jax.nn.log_softmax(logits_btv / temperature, axis=-1)[:, :-1]
    logp_bt = jnp.take_along_axis(log_probs_btv, rollouts.input_ids[:, 1:, None], axis=-1)[..., 0]
    entropy_bt = -jnp.sum(jnp.exp(log_probs_btv) * log_probs_btv, axis=-1)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
    return pad(logp_bt), pad(entropy_bt)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _reference_value_and_grad(params, base_params, rollouts, graphdef, config: RLConfig):
    return jax.value_and_grad(_reference_loss, has_aux=True)(params, base_params, rollouts, graphdef, config)


def _reference_loss(params, base_params, rollouts, graphdef, config: RLConfig):
    """The batch loss written from the equations, independently of fst_jax.rl.losses."""
    logp, entropy = _reference_logprobs(graphdef, params, rollouts, config.temperature)
    base_logp, _ = _reference_logprobs(graphdef, base_params, rollouts, config.temperature)
    base_logp = jax.lax.stop_gradient(base_logp)
    mask = jnp.asarray(rollouts.loss_mask).at[:, 0].set(0.0) > 0
    adv = jnp.asarray(rollouts.advantages)[:, None]
    ratio = jnp.exp(jnp.where(mask, logp - rollouts.old_logprobs, 0.0))
    if config.loss == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(ratio, config.tau)) * adv * logp
        cut = ratio > config.tau
    else:
        clipped = jnp.clip(ratio, 1 - config.eps_low, 1 + config.eps_high)
        per_token = -jnp.minimum(ratio * adv, clipped * adv)
        cut = ((ratio < 1 - config.eps_low) & (adv < 0)) | ((ratio > 1 + config.eps_high) & (adv > 0))
    d = jnp.where(mask, base_logp - logp, 0.0)
    kl = {"k1": -d, "k2": 0.5 * d ** 2, "k3": jnp.exp(d) - d - 1}[config.kl_estimator]

    def agg(x):
        x = jnp.where(mask, x, 0.0)
        if config.aggregation == "token_mean":
            return jnp.sum(x) / jnp.sum(mask)
        n = jnp.sum(mask, axis=1)
        rows = n > 0
        return jnp.sum(jnp.where(rows, jnp.sum(x, axis=1) / jnp.maximum(n, 1), 0.0)) / jnp.sum(rows)

    token_mean = lambda x: jnp.sum(jnp.where(mask, x, 0.0)) / jnp.sum(mask)
    stats = {"kl": agg(kl), "policy_loss": agg(per_token), "entropy": token_mean(entropy),
             "importance_weight_mean": token_mean(ratio),
             "importance_weight_max": jnp.max(jnp.where(mask, ratio, 0.0)),
             ("truncated_fraction" if config.loss == "cispo" else "clip_fraction"): token_mean(cut)}
    return agg(per_token + config.kl_coef * kl), stats


def _random_rollouts(graphdef, params, *, rows=8, seed=0, keep=None, noise=0.5):
    """Rows of random prompts and responses; old log-probs = the model's own ± noise, so that importance
    weights spread out (some above τ, some outside the PPO range)."""
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(6, TINY.vocab_size, rng.randint(2, 7))) for _ in range(rows)]
    responses = [list(rng.randint(6, TINY.vocab_size, rng.randint(1, 9))) for _ in range(rows)]
    zeros = [[0.0] * len(r) for r in responses]
    advantages = rng.randn(rows).astype(np.float32)
    draft = build_rollouts(prompts, responses, zeros, advantages, keep=keep)
    logp, _ = _reference_logprobs(graphdef, params, draft, 1.0)
    old = np.asarray(logp) + noise * rng.randn(*logp.shape).astype(np.float32)
    return draft.replace(old_logprobs=np.where(draft.loss_mask > 0, old, 0.0).astype(np.float32))


# One jitted gradient function and one shared config, so tests reuse each other's compiled programs.
_gradients = jax.jit(compute_gradients, static_argnames=("graphdef", "config"))
CONFIG = RLConfig(learning_rate=1e-4, warmup_steps=0, kl_coef=0.1)


def _assert_grads_close(grads, reference, rtol=1e-4):
    """Leaf by leaf, to a tolerance relative to the leaf's largest gradient (fp32 sums in another order)."""
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * float(np.max(np.abs(r))))


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------------------
# Config and optimizer


def test_config_from_config_dict_and_errors():
    cd = ml_collections.ConfigDict({"learning_rate": 3e-4, "loss": "ppo_clip", "micro_batch_size": 4})
    config = RLConfig.from_config(cd)
    assert (config.learning_rate, config.loss, config.micro_batch_size, config.tau) == (3e-4, "ppo_clip", 4, 4.0)
    with pytest.raises(ValueError, match=r"unknown RL config field\(s\) \['lr'\]"):
        RLConfig.from_config({"lr": 1e-3})
    for bad, message in [({"loss": "grpo"}, "RLConfig.loss must be one of"),
                         ({"kl_estimator": "k4"}, "kl_estimator"), ({"aggregation": "sum"}, "aggregation"),
                         ({"micro_batch_size": 0}, "micro_batch_size"), ({"temperature": 0.0}, "temperature"),
                         ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"b2": 1.0}, "b2"),
                         ({"rollouts_per_problem": 0}, "rollouts_per_problem"), ({"warmup_steps": -1}, "warmup")]:
        with pytest.raises(ValueError, match=message):
            RLConfig(**bad)


def test_optimizer_is_adamw_with_warmup_and_clipping():
    config = RLConfig(learning_rate=0.1, b1=0.5, b2=0.9, weight_decay=0.3, warmup_steps=4, max_grad_norm=0.5)
    schedule = rl_config_lib.learning_rate_schedule(config)
    np.testing.assert_allclose([schedule(n) for n in range(6)], [0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rtol=1e-6)
    constant = rl_config_lib.learning_rate_schedule(RLConfig(learning_rate=0.2, warmup_steps=0))
    assert float(constant(0)) == float(constant(7)) == pytest.approx(0.2)
    reference = optax.chain(optax.clip_by_global_norm(0.5),
                            optax.adamw(lambda n: 0.1 * jnp.minimum(1.0, (n + 1) / 4), b1=0.5, b2=0.9,
                                        weight_decay=0.3))
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    ours, ref = params, params
    tx = make_optimizer(ml_collections.ConfigDict(dict(learning_rate=0.1, b1=0.5, b2=0.9, weight_decay=0.3,
                                                       warmup_steps=4, max_grad_norm=0.5)))
    ours_state, ref_state = tx.init(params), reference.init(params)
    for n in range(5):
        grads = {"w": jnp.array([3.0, -1.0, 0.5]) * (n + 1), "b": jnp.array(-2.0)}
        u, ours_state = tx.update(grads, ours_state, ours)
        ours = optax.apply_updates(ours, u)
        u, ref_state = reference.update(grads, ref_state, ref)
        ref = optax.apply_updates(ref, u)
    assert _max_abs_diff(ours, ref) < 1e-7
    unclipped = make_optimizer(RLConfig(learning_rate=0.1, b1=0.5, b2=0.9, weight_decay=0.3, warmup_steps=4))
    u, _ = unclipped.update({"w": jnp.array([3.0, -1.0, 0.5]), "b": jnp.array(-2.0)}, unclipped.init(params),
                            params)
    assert _max_abs_diff(optax.apply_updates(params, u), ours) > 1e-3  # clipping changes the trajectory


# ---------------------------------------------------------------------------------------------------------
# Rollout packing


def test_build_rollouts_layout():
    ro = build_rollouts([[5, 6, 7], [8], [9, 10]], [[11, 12], [13, 14, 15], [16]],
                        [[-0.1, -0.2], [-0.3, -0.4, -0.5], [-0.6]], [1.0, -1.0, 2.0], keep=[True, False, True],
                        pad_id=0, row_multiple=4)
    assert ro.shape == (4, 16)  # 3 rows rounded up to 4; length bucket 16
    np.testing.assert_array_equal(ro.input_ids[:, :6], [[5, 6, 7, 11, 12, 0], [9, 10, 16, 0, 0, 0],
                                                        [0] * 6, [0] * 6])
    np.testing.assert_array_equal(ro.attention_mask[:2, :6], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(ro.loss_mask[:2, :6], [[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]])
    np.testing.assert_allclose(ro.old_logprobs[0, 3:5], [-0.1, -0.2])
    np.testing.assert_allclose(ro.advantages, [1.0, 2.0, 0.0, 0.0])  # the dropped row became padding
    assert pad_rows(ro, 6).shape == (6, 16) and float(pad_rows(ro, 6).loss_mask[4:].sum()) == 0
    assert [length_bucket(n) for n in (1, 16, 17, 33, 300, 1100)] == [16, 16, 32, 48, 320, 1152]
    with pytest.raises(ValueError, match="row 0: 2 response tokens but 1 log-probs"):
        build_rollouts([[1]], [[2, 3]], [[0.0]], [1.0])


# ---------------------------------------------------------------------------------------------------------
# Gradients and update


REFERENCE_CONFIGS = {
    "cispo_k3_seq_mean": CONFIG,
    "ppo_token_mean_k1": RLConfig(loss="ppo_clip", eps_low=0.1, eps_high=0.3, aggregation="token_mean",
                                  kl_estimator="k1", kl_coef=0.2),
    "cispo_tau_k2_temp_chunk_micro": RLConfig(tau=1.2, kl_estimator="k2", kl_coef=0.5, temperature=0.7,
                                             logprob_chunk_size=5, micro_batch_size=2),
}


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_gradients_and_metrics_match_reference(tiny, name):
    config = REFERENCE_CONFIGS[name]
    graphdef, params, base = tiny
    rollouts = _random_rollouts(graphdef, params, keep=[True] * 6 + [False] * 2)
    grads, metrics = _gradients(params, base, rollouts, graphdef=graphdef, config=config)
    (ref_loss, ref_stats), ref_grads = _reference_value_and_grad(params, base, rollouts, graphdef, config)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5, atol=1e-7)
    for key, value in ref_stats.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    _assert_grads_close(grads, ref_grads)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(ref_grads), rtol=1e-5)
    assert float(metrics["num_rows"]) == 6 and float(metrics["num_tokens"]) == float(rollouts.loss_mask.sum())
    assert float(metrics["kl"]) > 0
    # the configured knobs matter: the importance weights really are cut by τ / the PPO range somewhere
    cut_key = "truncated_fraction" if config.loss == "cispo" else "clip_fraction"
    if name != "cispo_k3_seq_mean":
        assert 0 < float(metrics[cut_key]) < 1


def _fresh_state(graphdef, params, config, mesh=None):
    if mesh is not None:
        params = jax.device_put(params, parallel.param_shardings(params, mesh, parallel.TRAIN_RULES))
    return TrainState.create((graphdef, params), config), params


def test_micro_batched_update_equals_single_batch(tiny):
    """(Gradients of a micro-batched config are checked leaf by leaf against the reference above.)"""
    graphdef, params, base = tiny
    # Rows 3, 5, 6 dropped: the kept rows come first, so with micro-batches of 2 the last one holds no loss
    # token and is skipped by lax.cond.
    rollouts = _random_rollouts(graphdef, params, keep=[True, True, True, False, True, False, False, True])
    micro = dataclasses.replace(CONFIG, micro_batch_size=2)
    state, metrics = update(_fresh_state(graphdef, params, CONFIG)[0], base, rollouts, CONFIG)
    micro_state, micro_metrics = update(_fresh_state(graphdef, params, micro)[0], base, rollouts, micro)
    # Adam's first step is blind to the gradient's scale, so the metrics check it: same loss, same norm
    for key in ("loss", "kl", "entropy", "grad_norm", "importance_weight_mean", "importance_weight_max",
                "truncated_fraction", "num_tokens", "num_rows"):
        np.testing.assert_allclose(micro_metrics[key], metrics[key], rtol=1e-6, err_msg=key)
    assert float(metrics["num_rows"]) == 5
    assert _max_abs_diff(state.params, params) > 5e-5  # it moved (≈ lr per weight) ...
    assert _max_abs_diff(micro_state.params, state.params) <= 1e-6  # ... identically
    assert _max_abs_diff(micro_state.opt_state, state.opt_state) <= 1e-6


@pytest.mark.parametrize("mesh_config, micro_batch_size", [({"fsdp": 8}, None), ({"fsdp": 4, "tensor": 2}, 4)],
                         ids=["fsdp8", "fsdp4-tensor2-micro4"])
def test_sharded_update_equals_single_device(tiny, mesh_config, micro_batch_size):
    graphdef, params, base = tiny
    rollouts = _random_rollouts(graphdef, params)
    # Micro-batching and chunking are exact, so the single-device reference runs the plain CONFIG.
    config = dataclasses.replace(CONFIG, micro_batch_size=micro_batch_size, logprob_chunk_size=8)
    mesh = parallel.make_mesh(mesh_config)
    sharded_state, sharded_params = _fresh_state(graphdef, params, config, mesh)
    expected = jax.tree.map(lambda x: x.sharding, sharded_params)
    sharded_base = jax.device_put(base, expected)
    state, metrics = update(_fresh_state(graphdef, params, CONFIG)[0], base, rollouts, CONFIG)
    sharded_state, sharded_metrics = update(sharded_state, sharded_base, rollouts, config)
    assert float(sharded_metrics["skipped"]) == 0
    # Adam's first step is blind to the gradient's scale, so the metrics check it: same loss, same norm
    for key in ("loss", "kl", "entropy", "grad_norm", "importance_weight_mean", "importance_weight_max"):
        np.testing.assert_allclose(sharded_metrics[key], metrics[key], rtol=1e-5, err_msg=key)
    assert _max_abs_diff(sharded_state.params, state.params) <= 1e-6
    # the update keeps the training layout (FSDP over the mesh) for params and Adam's moments
    for new, want in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(expected)):
        assert new.sharding.is_equivalent_to(want, new.ndim), (new.sharding, want)
    for leaf, want in zip(jax.tree.leaves(sharded_state.opt_state[0].mu), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def _row_logprob_sums(graphdef, params, rollouts):
    logp, _ = _reference_logprobs(graphdef, params, rollouts, 1.0)
    return np.asarray(jnp.sum(jnp.where(rollouts.loss_mask > 0, logp, 0.0), axis=1))


def test_update_raises_positive_and_lowers_negative_advantage_responses(tiny):
    graphdef, params, base = tiny
    rollouts = _random_rollouts(graphdef, params, seed=3, noise=0.0)  # on-policy: ρ = 1
    advantages = np.array([1.0, -1.0] * 4, np.float32)
    rollouts = rollouts.replace(advantages=advantages)
    before = _row_logprob_sums(graphdef, params, rollouts)
    state, metrics = update(_fresh_state(graphdef, params, CONFIG)[0], base, rollouts, CONFIG)
    np.testing.assert_allclose(metrics["importance_weight_mean"], 1.0, atol=1e-5)
    change = _row_logprob_sums(graphdef, state.params, rollouts) - before
    assert np.all(change[advantages > 0] > 0) and np.all(change[advantages < 0] < 0), change


def test_nan_loss_never_reaches_params(tiny):
    graphdef, params, base = tiny
    rollouts = _random_rollouts(graphdef, params)
    config = CONFIG
    state, _ = _fresh_state(graphdef, params, config)
    state, metrics = update(state, base, rollouts, config)  # a good step first: step 1, Adam moments ≠ 0
    assert float(metrics["skipped"]) == 0 and int(state.step) == 1
    before = jax.device_get((state.params, state.opt_state))
    bad = rollouts.replace(advantages=rollouts.advantages.copy())
    bad.advantages[2] = np.nan
    state, metrics = update(state, base, bad, config)
    assert float(metrics["skipped"]) == 1 and float(metrics["nonfinite"]) == 1 and int(state.step) == 1
    assert _max_abs_diff((state.params, state.opt_state), before) == 0
    state, metrics = update(state, base, rollouts, config)  # training continues from the untouched state
    assert float(metrics["skipped"]) == 0 and int(state.step) == 2


def test_update_input_errors(tiny):
    graphdef, params, base = tiny
    rollouts = _random_rollouts(graphdef, params)
    state, _ = _fresh_state(graphdef, params, RLConfig())
    with pytest.raises(ValueError, match="needs base_params for the KL term"):
        update(state, None, rollouts, RLConfig())
    with pytest.raises(ValueError, match="share buffers with state.params"):
        update(state, state.params, rollouts, RLConfig())
    mesh = parallel.make_mesh({"fsdp": 8})
    sharded_state, _ = _fresh_state(graphdef, params, RLConfig(), mesh)
    with pytest.raises(ValueError, match=r"micro_batch_size 4 must be a multiple of the mesh's batch axes"):
        update(sharded_state, base, rollouts, RLConfig(micro_batch_size=4))


def test_chunked_logprobs_bound_update_memory_at_qwen3_vocab():
    """Compile (not run) the update of a 1-layer model with Qwen3's 151,936-token vocab: with chunked log-probs
    the temporaries no longer hold [B, T, V] float32 logits and their gradient."""
    config_model = TINY.replace(vocab_size=151_936, hidden_size=64, intermediate_size=128)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Qwen3(config_model, rngs=nnx.Rngs(0))), nnx.Param)
    B, T = 4, 512
    temp = {}
    for chunk in (None, 32):
        config = RLConfig(logprob_chunk_size=chunk)
        state = TrainState(params=abstract_params, opt_state=jax.eval_shape(make_optimizer(config).init,
                                                                           abstract_params),
                           step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                           num_rollouts=jax.ShapeDtypeStruct((), jnp.int32), graphdef=graphdef)
        compiled = rl_update.lower_update(state, abstract_params, config, rows=B, lengths=(T,))[f"gradients@{T}"]
        temp[chunk] = compiled.compile().memory_analysis().temp_size_in_bytes
    logits_bytes = B * T * 151_936 * 4
    print(f"update temp bytes at V=151936, B={B}, T={T}: unchunked {temp[None] / 2**20:.0f} MiB, "
          f"chunk 32: {temp[32] / 2**20:.0f} MiB; one [B,T,V] f32 logits tensor = {logits_bytes / 2**20:.0f} MiB")
    assert temp[None] > 2 * logits_bytes  # logits, their softmax and gradient
    assert temp[32] < logits_bytes  # not even one: [B, 32, V] blocks plus the [V, D] embedding's gradient


# ---------------------------------------------------------------------------------------------------------
# The coupled step


class ScriptedGenerate:
    """A stand-in sampler: records its requests and answers with fixed text (one char token per letter)."""

    def __init__(self, text_for):
        self.text_for, self.calls = text_for, []

    def __call__(self, graphdef, params, prompts, **kwargs):
        self.calls.append((prompts, kwargs))
        tokens = []
        for p, prompt in enumerate(prompts):
            for s in range(kwargs["num_samples"]):
                text = self.text_for(TOKENIZER.decode(prompt), s)
                tokens.append(TOKENIZER(text, add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id])
        return SampleOutput(tokens=tokens, logprobs=[np.full(len(t), -4.6, np.float32) for t in tokens],
                            finished=[s % 2 == 0 for s in range(len(tokens))])


# fst_step tests with a scripted sampler share this config and batch shape (3 problems × 6 rollouts), so they
# share one compiled update (the sampling-only fields do not enter it).
SCRIPTED = RLConfig(rollouts_per_problem=6, max_new_tokens=5, temperature=0.7, kl_coef=0.0, learning_rate=1e-3)


def test_fst_step_splits_rollouts_evenly_across_the_population(tiny):
    graphdef, params, base = tiny
    population = ["Answer with a.", "Answer with b."]
    # prompt "with a." → "aaa", "with b." → "b" + as many a's as the sample index
    generate = ScriptedGenerate(lambda prompt, s: "aaa" if "with a." in prompt else "b" + "a" * s)
    batch = [{"question": "one?"}, {"question": "two?"}, {"question": "three?"}]
    config = dataclasses.replace(SCRIPTED, enable_thinking=False)
    state = TrainState.create((graphdef, params), config, seed=3)
    reward = lambda problem, text: text.count("a") / 3.0
    state, metrics = fst_step(state, population, batch, tokenizer=TOKENIZER, reward_fn=reward, base_params=None,
                              config=config, generate=generate)
    (prompts, kwargs), = generate.calls
    assert kwargs["num_samples"] == 3 and kwargs["max_new_tokens"] == 5 and kwargs["temperature"] == 0.7
    # one stop rule everywhere: EOS and Qwen3's turn/document ends (sampling/chat.py default_stop_token_ids)
    eos, end = TOKENIZER.eos_token_id, TOKENIZER.get_vocab()["<|endoftext|>"]
    assert kwargs["stop_token_ids"] == [eos, end] and kwargs["pad_id"] == TOKENIZER.pad_token_id
    texts = [TOKENIZER.decode(p) for p in prompts]
    assert len(texts) == 6  # problem-major, then population order: G/K = 3 samples of each
    for i, question in enumerate(["one?", "two?", "three?"]):
        for k, system in enumerate(population):
            assert texts[2 * i + k] == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}"
                                        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # rewards per problem: prompt 0 → 1, 1, 1; prompt 1 → 0, 1/3, 2/3
    assert metrics["reward_prompt_0"] == 1.0 and metrics["reward_prompt_1"] == pytest.approx(1 / 3)
    assert metrics["reward_mean"] == pytest.approx(2 / 3)
    assert metrics["reward_std"] == pytest.approx(np.std([1, 1, 1, 0, 1 / 3, 2 / 3]))
    assert metrics["response_length"] == pytest.approx(np.mean([4, 4, 4, 2, 3, 4]))
    assert metrics["response_truncated_fraction"] == pytest.approx(3 / 6)  # ScriptedGenerate: odd rows unfinished
    assert metrics["groups_kept_fraction"] == 1.0 and metrics["num_rollouts"] == 18 and metrics["step"] == 1
    assert metrics["skipped"] == 0 and metrics["num_rows"] == 18
    assert metrics["learning_rate"] == pytest.approx(1e-3 / 10)  # first of 10 warm-up steps
    # a population of one (the RL baseline), thinking left to the template: all 6 rollouts from one prompt
    state, metrics = fst_step(state, ["Answer with b."], batch, tokenizer=TOKENIZER, reward_fn=reward,
                              base_params=None, config=SCRIPTED, generate=generate)
    prompts, kwargs = generate.calls[-1]
    assert len(prompts) == 3 and kwargs["num_samples"] == 6
    assert "<think>" not in TOKENIZER.decode(prompts[0])
    assert metrics["reward_prompt_0"] == pytest.approx(np.mean([0, 1, 2, 3, 4, 5]) / 3)
    assert metrics["num_rollouts"] == 36 and "reward_prompt_1" not in metrics
    assert metrics["learning_rate"] == pytest.approx(1e-3 * 2 / 10)  # second warm-up step


def test_fst_step_drops_zero_variance_groups(tiny):
    graphdef, params, base = tiny
    # problems "same…": every rollout scores 1 (no signal, dropped); problem "mixed": half and half
    generate = ScriptedGenerate(lambda prompt, s: "a" if "same" in prompt else "ab"[s % 2])
    state = TrainState.create((graphdef, params), SCRIPTED)
    kwargs = dict(tokenizer=TOKENIZER, base_params=None, config=SCRIPTED, generate=generate)
    batch = [{"question": "same"}, {"question": "mixed"}, {"question": "same again"}]
    population = ["Answer with b."]  # the same prompt length as above: the same length bucket, the same program
    state, metrics = fst_step(state, population, batch, reward_fn=lambda problem, text: float("a" in text),
                              **kwargs)
    assert metrics["groups_kept_fraction"] == pytest.approx(1 / 3) and metrics["num_rows"] == 6
    assert metrics["skipped"] == 0 and metrics["step"] == 1
    # no group with signal: nothing to learn, nothing applied, but the rollouts are counted
    state, metrics = fst_step(state, population, batch, reward_fn=lambda problem, text: 1.0, **kwargs)
    assert metrics["groups_kept_fraction"] == 0 and metrics["skipped"] == 1 and metrics["num_tokens"] == 0
    assert metrics["step"] == 1 and metrics["num_rollouts"] == 36


def test_fst_step_bad_inputs(tiny):
    graphdef, params, base = tiny
    config = RLConfig(rollouts_per_problem=4, max_new_tokens=3)
    state = TrainState.create((graphdef, params), config)
    generate = ScriptedGenerate(lambda prompt, s: "x")
    kwargs = dict(tokenizer=TOKENIZER, reward_fn=lambda p, t: 1.0, base_params=base, config=config,
                  generate=generate)
    with pytest.raises(ValueError, match=r"K = 3 prompts, which does not divide rollouts_per_problem G = 4"):
        fst_step(state, ["a", "b", "c"], [{"question": "q"}], **kwargs)
    with pytest.raises(ValueError, match="the batch of problems is empty"):
        fst_step(state, ["a"], [], **kwargs)
    with pytest.raises(ValueError, match="prompt population is empty"):
        fst_step(state, [], [{"question": "q"}], **kwargs)
    with pytest.raises(ValueError, match="not one string"):
        fst_step(state, "a prompt", [{"question": "q"}], **kwargs)
    with pytest.raises(ValueError, match="has no 'question' field"):
        fst_step(state, ["a"], [{"text": "q"}], **kwargs)
    nan_for_second = lambda problem, text: math.nan if problem["question"] == "q1" else 0.5
    with pytest.raises(ValueError, match=r"reward_fn returned nan for problem 1 \(rollout 0, prompt 0"):
        fst_step(state, ["a", "b"], [{"question": "q0"}, {"question": "q1"}],
                 **{**kwargs, "reward_fn": nan_for_second})
    with pytest.raises(ValueError, match="it must return a float"):
        fst_step(state, ["a"], [{"question": "q"}], **{**kwargs, "reward_fn": lambda p, t: None})
    assert int(state.step) == 0


def test_fst_step_learns_a_rewarded_character(tiny):
    """A tiny random model learns to write vowels (reward = fraction of vowels in the response), with the real
    sampler, on 8 devices (FSDP × tensor parallel), micro-batched: the whole coupled step as a run uses it."""
    graphdef, params, _ = tiny
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    config = RLConfig(learning_rate=5e-3, warmup_steps=0, rollouts_per_problem=8, max_new_tokens=8,
                      kl_coef=1e-3, micro_batch_size=16)
    state, base = _fresh_state(graphdef, params, config, mesh)  # base: the sharded initial params
    vowels = lambda problem, text: sum(c in "aeiou" for c in text) / max(len(text), 1)
    batch = [{"question": q} for q in ("abc", "hello", "xyz", "qq")]
    rewards, kls = [], []
    for i in range(30):
        state, metrics = fst_step(state, ["Say vowels.", "Be brief."], batch, tokenizer=TOKENIZER,
                                  reward_fn=vowels, base_params=base, config=config)
        rewards.append(metrics["reward_mean"])
        kls.append(metrics["kl"])
        if i == 0:  # on-policy: the sampler's log-probs are the update's (same temperature, same alignment)
            assert metrics["importance_weight_mean"] == pytest.approx(1.0, abs=1e-4)
            assert metrics["importance_weight_max"] == pytest.approx(1.0, abs=1e-3)
    print("reward per step:", " ".join(f"{r:.3f}" for r in rewards))
    print("KL to base per step:", " ".join(f"{k:.4f}" for k in kls))
    assert kls[0] == pytest.approx(0.0, abs=1e-9) and np.mean(kls[-5:]) > max(0.05, 3 * np.mean(kls[5:10]))
    assert np.mean(rewards[-5:]) > 0.3 and np.mean(rewards[-5:]) > 4 * np.mean(rewards[:5])
    assert metrics["num_rollouts"] == 30 * 4 * 8 and metrics["step"] == 30
    for leaf, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(base)):
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
