"""Problem streams: grain determinism, epochs, look-ahead windows, exact resume, process shares, splits."""

import json
from collections import Counter
from pathlib import Path

import grain
import pytest

from fst_jax.data import ProblemStream, load_splits, process_slice, split_problems
from fst_jax.tasks import DataError, get_task

DATA = Path(__file__).parent / "data"
PROBLEMS = [{"question": f"q{i}", "answer": str(i), "id": f"p{i}"} for i in range(10)]


def ids(batches):
    return [[p["id"] for p in b] for b in batches]


def stream(batch_size=4, seed=3, problems=PROBLEMS, **kw):
    return ProblemStream(problems, batch_size, seed, **kw)


def reference(n_batches, batch_size=4, seed=3, n=10):
    """The batches as grain's own pipeline orders them, built independently of ProblemStream."""
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    flat = [int(ds[i]) for i in range(n_batches * batch_size)]
    return [[f"p{i}" for i in flat[k * batch_size:(k + 1) * batch_size]] for k in range(n_batches)]


def test_batches_follow_the_seeded_grain_pipeline():
    s = stream()
    got = ids(s.next_batch() for _ in range(8))
    assert got == reference(8)
    assert all(len(b) == 4 for b in got)                       # batches are full, even across epochs
    again, other = stream(), stream(seed=4)
    assert ids(again.next_batch() for _ in range(8)) == got     # deterministic
    assert ids(other.next_batch() for _ in range(8)) != got
    assert s.batches_consumed == 8


def test_every_epoch_is_a_fresh_permutation():
    problems = [{"id": f"p{i}"} for i in range(12)]
    s = ProblemStream(problems, 4, seed=0, process_index=0, process_count=1)
    epochs = [sum(ids(s.next_batch() for _ in range(3)), []) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(p["id"] for p in problems)   # each problem once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]         # reshuffled every epoch


def test_window_is_exactly_the_next_batches_consumed():
    s = stream()
    window = s.window(3)
    assert s.buffered == 3 and s.batches_consumed == 0
    assert s.window(3) == window                     # looking again consumes nothing
    assert s.window(2) == window[:2]
    consumed = [s.next_batch() for _ in range(3)]
    assert consumed == window
    assert ids(consumed) == reference(3)
    # Mid-window: a longer window starts at the next unconsumed batch.
    s.window(2)
    s.next_batch()
    later = s.window(4)
    assert [s.next_batch() for _ in range(4)] == later
    assert ids(later) == reference(9)[4:8]
    assert s.window(0) == [] and s.buffered == 0


def test_window_problems_are_the_training_problems_of_the_next_steps():
    # The RECIPE's cycle: GEPA sees T·B problems, then the T RL steps train on exactly those, in order.
    s = stream(batch_size=2, seed=0)
    for _cycle in range(3):
        window = s.window(6)
        gepa_items = [p["id"] for b in window for p in b]
        trained = [p["id"] for _ in range(6) for p in s.next_batch()]
        assert trained == gepa_items


def _json(state):
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("consume_before, window, consume_in_window", [
    (0, 0, 0), (5, 0, 0), (2, 3, 0), (2, 3, 1), (2, 3, 3), (7, 4, 2),
])
def test_resume_is_exact(consume_before, window, consume_in_window):
    total = 16
    expected = reference(total)
    s = stream()
    seen = ids(s.next_batch() for _ in range(consume_before))
    if window:
        s.window(window)
        seen += ids(s.next_batch() for _ in range(consume_in_window))
    state = _json(s.get_state())

    resumed = stream()
    resumed.set_state(state)
    assert resumed.batches_consumed == len(seen)
    assert resumed.buffered == window - consume_in_window if window else resumed.buffered == 0
    if window:  # the rest of the interrupted window is the same
        assert ids(resumed.window(window - consume_in_window)) == expected[len(seen):consume_before + window]
    rest = ids(resumed.next_batch() for _ in range(total - len(seen)))
    assert seen + rest == expected
    # ... and the original stream, not interrupted, agrees.
    assert ids(s.next_batch() for _ in range(total - len(seen))) == rest


def test_state_is_plain_json():
    s = stream()
    s.next_batch()
    s.window(2)
    s.next_batch()
    state = s.get_state()
    assert json.loads(json.dumps(state)) == state
    assert state["batches_consumed"] == 2 and len(state["buffered"]) == 1 and len(state["buffered"][0]) == 4
    assert state["iterator"] == {"next_index": 3}
    assert {k: state[k] for k in ("version", "num_problems", "batch_size", "seed")} == {
        "version": 1, "num_problems": 10, "batch_size": 4, "seed": 3}


def test_resume_refuses_other_data_or_settings():
    state = _json(stream().get_state())
    with pytest.raises(DataError, match=r"changed since the state was saved \(seed 3 -> 4\)"):
        stream(seed=4).set_state(state)
    with pytest.raises(DataError, match=r"batch_size 4 -> 2"):
        stream(batch_size=2).set_state(state)
    with pytest.raises(DataError, match=r"num_problems 10 -> 9"):
        stream(problems=PROBLEMS[:9]).set_state(state)
    with pytest.raises(DataError, match="unsupported problem-stream state version 7"):
        stream().set_state({**state, "version": 7})
    with pytest.raises(DataError, match="buffered batches that do not fit"):
        stream().set_state({**state, "buffered": [[0, 1, 2, 99]]})


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_shares_partition_each_global_batch(process_count):
    streams = [stream(batch_size=8, process_index=p, process_count=process_count) for p in range(process_count)]
    for _ in range(5):
        globals_ = [s.next_batch() for s in streams]
        assert all(g == globals_[0] for g in globals_)       # every process sees the same global batch
        shares = [s.local(g) for s, g in zip(streams, globals_)]
        assert all(len(sh) == 8 // process_count == s.local_batch_size for sh, s in zip(shares, streams))
        assert sum(shares, []) == globals_[0]                 # disjoint, contiguous, in order
    assert process_slice(list("abcdef"), 1, 3) == ["c", "d"]


def test_process_share_errors_and_defaults():
    with pytest.raises(ValueError, match="batch_size 6 must be divisible by the number of processes \\(4\\)"):
        stream(batch_size=6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index 2 is not in \\[0, 2\\)"):
        stream(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="does not split evenly over 4 processes"):
        process_slice([1, 2, 3], 0, 4)
    s = stream()                                              # single process: jax's defaults
    assert (s.process_index, s.process_count, s.local_batch_size) == (0, 1, 4)
    with pytest.raises(DataError, match="no problems"):
        ProblemStream([], 4, 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ProblemStream(PROBLEMS, 0, 0)


def test_split_problems_is_deterministic_and_disjoint():
    problems = [{"id": f"p{i}"} for i in range(40)]
    train, val = split_problems(problems, 0.25, seed=1)
    assert len(val) == 10 and len(train) == 30
    assert sorted(p["id"] for p in train + val) == sorted(p["id"] for p in problems)
    assert split_problems(problems, 0.25, seed=1) == (train, val)
    assert split_problems(problems, 0.25, seed=2)[1] != val
    order = [p["id"] for p in problems]
    assert [p["id"] for p in val] == sorted((p["id"] for p in val), key=order.index)   # original order kept
    assert split_problems(problems, 0.0, seed=1) == (problems, [])
    assert len(split_problems(problems[:3], 0.01, seed=0)[1]) == 1       # a positive fraction holds out one
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_problems(problems, 1.0, seed=0)
    with pytest.raises(DataError, match="still have some to train on"):
        split_problems(problems[:1], 0.5, seed=0)


def test_load_splits_from_files():
    task = get_task("math")
    fields = {"question": "problem", "answer": "solution", "id": "uid"}
    train, val = load_splits(task, DATA / "math_small.jsonl", fields, val_fraction=0.2, seed=0)
    assert len(train) == 8 and len(val) == 2 and not {p["id"] for p in train} & {p["id"] for p in val}
    assert load_splits(task, DATA / "math_small.jsonl", fields, val_fraction=0.2, seed=0) == (train, val)
    train, val = load_splits(task, DATA / "math_small.jsonl", fields, val_files=DATA / "math_small.jsonl")
    assert train == val and len(val) == 10
    with pytest.raises(ValueError, match="either val_files or val_fraction"):
        load_splits(task, DATA / "math_small.jsonl", fields, val_files=DATA / "math_small.jsonl", val_fraction=0.1)


def test_stream_over_a_loaded_file_covers_every_problem():
    train, _ = load_splits(get_task("math"), DATA / "math_small.jsonl", {"question": "problem", "answer": "solution"})
    s = ProblemStream(train, 5, seed=7, process_index=0, process_count=1)
    counts = Counter(p["id"] for b in s.window(4) for p in b)     # two epochs of 10
    assert set(counts.values()) == {2} and len(counts) == 10
