"""The request engine: the same tokens whatever the schedule (slot count, insertion order, compaction),
distinct noise for identical prompts, log-probs equal to a full forward pass, attention bounded by the live
length. Greedy parity with transformers goes through `Sampler.generate` (tests/test_sampling.py)."""

import collections

import jax
import numpy as np
import pytest
from flax import nnx

from fst_jax.models.hf import load_pretrained
from fst_jax.sampling import Sampler
from fst_jax.sampling.engine import (Engine, Request, fine_tail, insert_buckets, kv_bytes, lower_engine_programs,
                                    prompt_bucket)
from fst_jax.sampling.engine_programs import length_buckets, prefill_chunk, row_buckets, tail_buckets

NEW = 24
ENGINE_PROGRAMS = ("jit(_insert)", "jit(_decode)", "jit(_compact)", "jit(_empty)")
LENGTHS = [5, 13, 20, 27, 9, 40, 3, 17, 33]


@pytest.fixture(scope="module")
def tied(hf_checkpoints):
    model = load_pretrained(hf_checkpoints["tied"][0])
    return model, Sampler(model)


def _requests(vocab, num_samples=2, lengths=LENGTHS, seed=0):
    rng = np.random.RandomState(seed)
    return [Request(rng.randint(1, vocab, n).tolist(), num_samples, NEW - (i % 3) * 5)
            for i, n in enumerate(lengths)]


def _run(sampler, requests, slots, *, stops=(3, 7, 11, 19), temperature=1.0, chunk_steps=8, seed=4, columns=None):
    stop_ids = np.full(8, -1, np.int32)
    stop_ids[:len(stops)] = stops
    columns = columns or prompt_bucket(max(len(r.prompt) for r in requests)) + NEW
    engine = Engine(sampler.config, slots=slots, columns=columns, max_new_tokens=NEW, cache_dtype="float32",
                    chunk_steps=chunk_steps)
    out = engine.run(sampler.weights, requests, seed=seed, temperature=temperature, top_p=1.0, top_k=0,
                     stop_ids=stop_ids, pad_id=0)
    return out, engine.stats


@pytest.fixture(scope="module")
def schedules(tied):
    """The same sampled requests with 4 slots (many insertions) and 32 slots (compaction in the tail)."""
    _, sampler = tied
    requests = _requests(sampler.config.vocab_size)
    return requests, {slots: _run(sampler, requests, slots) for slots in (4, 32)}


def test_four_and_thirty_two_slots_give_the_same_tokens_and_logprobs(schedules):
    requests, runs = schedules
    (tokens4, logprobs4, finished4), stats4 = runs[4]
    (tokens16, logprobs16, finished16), stats16 = runs[32]
    assert stats4.inserts > stats16.inserts and stats16.compactions >= 1  # really different schedules
    assert tokens4 == tokens16 and finished4 == finished16
    for a, b in zip(logprobs4, logprobs16):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert len(tokens4) == sum(r.num_samples for r in requests)
    lengths = [len(t) for t in tokens4]
    assert len(set(lengths)) > 3 and any(finished4) and not all(finished4)  # stop tokens end rows early
    for r, req in enumerate(requests):  # each completion within its own request's limit
        for j in range(req.num_samples):
            assert lengths[2 * r + j] <= req.max_new_tokens


def test_sampled_logprobs_equal_a_full_forward_pass(tied, schedules):
    model, _ = tied
    requests, runs = schedules
    (tokens, logprobs, _), _ = runs[4]
    graphdef, params = nnx.split(model, nnx.Param)
    width = 64
    for row, (tok, lp) in enumerate(zip(tokens, logprobs)):
        prompt = requests[row // 2].prompt
        ids = np.zeros((1, width), np.int32)
        ids[0, :len(prompt) + len(tok)] = prompt + tok
        logits = np.asarray(nnx.merge(graphdef, params)(ids), np.float64)[0]
        at = logits[len(prompt) - 1:len(prompt) + len(tok) - 1]
        ref = at - at.max(-1, keepdims=True)
        ref = (ref - np.log(np.exp(ref).sum(-1, keepdims=True)))[np.arange(len(tok)), tok]
        np.testing.assert_allclose(lp, ref, atol=1e-4, rtol=0)
        if row == 5:
            break


def test_identical_prompts_get_distinct_noise(tied):
    _, sampler = tied
    prompt = _requests(sampler.config.vocab_size, 1, [12])[0]
    (tokens, _, _), _ = _run(sampler, [prompt, prompt, prompt], 4, stops=())
    assert len({tuple(t) for t in tokens}) == 3  # position in the list, not content, keys the noise


def test_a_request_keeps_its_tokens_when_its_neighbours_change(tied, schedules):
    _, sampler = tied
    requests, runs = schedules
    (tokens, logprobs, _), _ = runs[4]
    # request 2 alone is request 0 of its own call: its key changes. Request 2 after two others differs in
    # neighbours and prompt bucket but keeps index 2, and so its tokens.
    other = _requests(sampler.config.vocab_size, 2, [30, 6], seed=9)
    (mixed, mixed_lp, _), _ = _run(sampler, other + [requests[2]], 16)
    assert mixed[4:6] == tokens[4:6]
    np.testing.assert_allclose(mixed_lp[4], logprobs[4], atol=1e-5, rtol=0)


def test_greedy_is_the_same_with_one_slot_per_prompt_and_many(tied):
    _, sampler = tied
    requests = _requests(sampler.config.vocab_size, 1)
    (one, _, _), _ = _run(sampler, requests, 1, temperature=0.0, stops=())
    (many, _, _), _ = _run(sampler, requests, 16, temperature=0.0, stops=())
    assert one == many and all(len(t) == r.max_new_tokens for t, r in zip(one, requests))


def test_a_prefill_in_query_chunks_gives_the_same_tokens_with_smaller_scores(tied):
    """`prefill_scores_mb` small enough that 128-token prompts prefill in chunks of 64 (and of the smallest
    chunk, BLOCK, when even that is over): the same sampled tokens and log-probs as one whole-prompt prefill,
    through `Sampler.generate`, and the insertion's compiled temporaries shrink."""
    model, whole = tied
    c = whole.config
    rng = np.random.RandomState(5)
    prompts = [rng.randint(1, c.vocab_size, n).tolist() for n in (70, 128, 99, 3, 120)]
    two = 16 * c.num_heads * 64 * 128 * 4 / 2**20  # scores of 16 prompts × a 64-query chunk of a 128 bucket
    assert prefill_chunk(c, 16, 128, two) == 64 and prefill_chunk(c, 16, 128, 4 * two) == 128
    assert prefill_chunk(c, 16, 128, two / 100) == 64  # never below BLOCK
    args = dict(max_new_tokens=10, temperature=1.0, seed=2, num_samples=2, stop_token_ids=(3, 7))
    want = whole.generate(prompts, **args)
    chunked = Sampler(model, prefill_scores_mb=two)
    got = chunked.generate(prompts, **args)
    assert got.tokens == want.tokens and got.finished == want.finished
    for a, b in zip(got.logprobs, want.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

    def insert_temp(scores_mb):
        weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), whole.weights)
        lowered = lower_engine_programs(c, weights, slots=32, columns=128 + 10, max_new_tokens=10, num_samples=[2],
                                        prompt_buckets=[128], cache_dtype="float32", prefill_scores_mb=scores_mb)
        return lowered["insert_B32_C138_I16_P128_n2"].compile().memory_analysis().temp_size_in_bytes

    assert insert_temp(two) < insert_temp(2048) - 16 * c.num_heads * 64 * 128 * 4  # at least half the scores go


def test_buckets_are_few_and_cover_the_buffer():
    assert length_buckets(640) == [64, 128, 256, 512, 640]
    assert length_buckets(64) == [64]
    assert row_buckets(64) == [64, 16, 8]  # a call of 8 rows starts with 8 slots, not 16
    assert row_buckets(64, multiple=8) == [64]
    assert row_buckets(256, multiple=8, smallest=2) == [256, 64, 16]
    assert row_buckets(64, factor=2) == [64, 32, 16, 8]
    assert row_buckets(192, multiple=8) == [192, 64]  # a small call never holds all the slots
    assert tail_buckets(64) == [64, 32, 16, 8, 4]  # a tail halves down to 4 rows per shard
    assert tail_buckets(192, multiple=8) == [192, 96, 48]
    # one CPU device: steps of ¾ and ⅔ (a CPU step costs in proportion to its rows)
    assert tail_buckets(128, fine=True) == [128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4]
    assert tail_buckets(100, fine=True) == [100, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4]
    assert tail_buckets(192, multiple=8, fine=True) == [192, 128, 96, 64, 48, 32]
    assert fine_tail(None) and not fine_tail(None, platform="cuda")


def test_a_round_inserts_down_to_a_size_while_more_prompts_wait_than_fit(tied):
    """Insertion sizes include a refill's (an eighth of the slots); when the free slots, not the queue, limit a
    round, it inserts the size below (keeping at least half) instead of padding up to the size above."""
    _, sampler = tied
    assert insert_buckets(128, 1) == [1, 16, 32, 128]
    assert insert_buckets(64, 1) == [1, 8, 16, 64]
    assert insert_buckets(64, 8) == [1, 2, 8]
    assert insert_buckets(64, 1, multiple=8) == [8, 16, 64]
    engine = Engine(sampler.config, slots=128, columns=64, max_new_tokens=8, cache_dtype="float32")
    requests = [Request([1, 2], 1, 8)] * 300
    count = lambda fits, waiting: engine._insert_count(1, fits, collections.deque(range(waiting)), requests)  # noqa: E731
    assert count(20, 300) == 16  # 16 prompts now, the other 4 free slots wait for the next round
    assert count(31, 300) == 16
    assert count(40, 300) == 32
    assert count(70, 300) == 70  # 32 would leave more than half free: pad up to 128
    assert count(20, 12) == 12  # the queue's last prompts: all of them (padded to 16)
    assert count(200, 300) == 128
    assert count(3, 300) == 3  # below the smallest size but one: pad up rather than insert 1


def test_decode_attention_reads_only_the_attended_width(tied, monkeypatch):
    """Rows of ≤ 56 columns in a 256-column buffer decode at width 64: NaNs beyond it change nothing."""
    _, sampler = tied
    requests = _requests(sampler.config.vocab_size, 1, [20, 9])
    (clean, _, _), _ = _run(sampler, requests, 2, temperature=0.0, stops=(), columns=256)
    (whole, _, _), _ = _run(sampler, requests, 2, temperature=0.0, stops=(), columns=56)  # one width: 56
    original = Engine._empty_state

    def poisoned(self, rows):
        state = original(self, rows)
        nan = lambda x: x.at[:, :, 64:].set(np.nan)  # noqa: E731
        return state._replace(k=tuple(map(nan, state.k)), v=tuple(map(nan, state.v)))

    monkeypatch.setattr(Engine, "_empty_state", poisoned)
    (dirty, _, _), _ = _run(sampler, requests, 2, temperature=0.0, stops=(), columns=256)
    assert dirty == clean == whole


def test_a_run_after_its_listed_programs_compile_compiles_nothing(tied):
    _, sampler = tied
    requests = _requests(sampler.config.vocab_size, 2)
    columns = prompt_bucket(40) + NEW
    weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sampler.weights)
    lowered = lower_engine_programs(sampler.config, weights, slots=32, columns=columns, max_new_tokens=NEW,
                                    num_samples=[2], prompt_buckets=[64], cache_dtype="float32", chunk_steps=8)
    rows = [32, 24, 16, 12, 8, 6, 4]  # one CPU device: the tail steps by ¾ and ⅔ down to 4 rows
    assert sorted(lowered) == sorted(
        [f"compact_B{a}_C88_to{b}" for a in rows for b in rows if b < a]
        + [f"decode_B{r}_C88_W{w}" for r in rows for w in (64, 88)]
        + ["empty_B32_C88", "insert_B32_C88_I16_P64_n2", "insert_B32_C88_I1_P64_n2", "insert_B32_C88_I2_P64_n2",
           "insert_B32_C88_I4_P64_n2"])
    for program in lowered.values():
        program.compile()
    compiles = []

    def listener(event, duration, **kwargs):  # the engine's programs (a first use of jax.random compiles too)
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") in ENGINE_PROGRAMS:
            compiles.append(kwargs["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        (tokens, _, _), stats = _run(sampler, requests, 32, seed=11)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert stats.compactions >= 1 and len(tokens) == 2 * len(requests)
    assert compiles == []
    assert kv_bytes(sampler.config, 16, columns, "float32") == 2 * 2 * 16 * 2 * 88 * 16 * 4


def test_a_mesh_gives_the_tokens_of_one_device(tied, schedules):
    """Slots split over 4 data shards: the same samples as on one device (the host schedules from gathered
    flags; GSPMD places the scatters)."""
    from fst_jax.runtime import parallel

    model, _ = tied
    mesh = parallel.make_mesh({"data": 4}, devices=jax.devices()[:4])
    sharded = Sampler(model, mesh=mesh)
    requests, runs = schedules
    (tokens, logprobs, _), _ = runs[32]
    columns = prompt_bucket(max(len(r.prompt) for r in requests)) + NEW
    engine = Engine(sharded.config, slots=32, columns=columns, max_new_tokens=NEW,
                    cache_dtype="float32", chunk_steps=8, mesh=mesh)
    got, got_lp, _ = engine.run(sharded.weights, requests, seed=4, temperature=1.0, top_p=1.0, top_k=0,
                                stop_ids=(3, 7, 11, 19))
    assert got == tokens
    for a, b in zip(got_lp, logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_requests_it_cannot_serve_are_refused_in_one_line(tied):
    _, sampler = tied
    engine = Engine(sampler.config, slots=4, columns=64, max_new_tokens=16, cache_dtype="float32")
    run = lambda reqs: engine.run(sampler.weights, reqs, seed=0, temperature=1.0, top_p=1.0, top_k=0,  # noqa: E731
                                  stop_ids=())
    for reqs, message in [([Request([1, 2], 5, 8)], "raise slots"), ([Request([], 1, 8)], "empty prompt"),
                          ([Request([1, 200], 1, 8)], "outside the vocabulary"), ([Request([1], 1, 17)], "1 to 16"),
                          ([Request([1] * 60, 1, 16)], "build it larger")]:
        with pytest.raises(ValueError, match=message):
            run(reqs)
