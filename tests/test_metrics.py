"""MetricsWriter / read_metrics: JSONL round trip, non-finite values, truncation, resume; progress; plot.py."""

import importlib.util
import io
import json
import logging
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from fst_jax.runtime.metrics import MetricsWriter, progress, read_metrics, to_jsonable

ROOT = Path(__file__).resolve().parents[1]


def _strict_json_lines(path):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")
    return [json.loads(line, parse_constant=reject) for line in Path(path).read_text().splitlines()]


def test_round_trip_with_numpy_jax_and_non_finite(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        written = writer.write(np.int64(3), "train",
                               {"train/reward": np.float32(0.25), "kl_to_base": jnp.asarray(0.125),
                                "per_prompt": jnp.array([1.0, jnp.nan]), "flag": np.bool_(True)},
                               method="fst", task="math", rl_rollouts=np.int32(64))
        writer.write(4, "eval", {"val/reward": float("nan"), "hi": float("inf"), "lo": -math.inf,
                                 "nested": {"a": np.float64(1.5), "b": (1, 2)}})
    assert written["step"] == 3 and isinstance(written["time"], float)
    raw = _strict_json_lines(tmp_path / "metrics.jsonl")  # strict JSON: no NaN/Infinity tokens
    assert raw[1]["val/reward"] == "nan" and raw[1]["hi"] == "inf" and raw[1]["lo"] == "-inf"
    assert raw[0]["per_prompt"] == [1.0, "nan"]

    first, second = read_metrics(tmp_path)
    assert {k: v for k, v in first.items() if k != "time"} == {
        "step": 3, "kind": "train", "train/reward": 0.25, "kl_to_base": 0.125, "per_prompt": [1.0, first[
            "per_prompt"][1]], "flag": True, "method": "fst", "task": "math", "rl_rollouts": 64}
    assert math.isnan(first["per_prompt"][1])
    assert math.isnan(second["val/reward"]) and second["hi"] == math.inf and second["lo"] == -math.inf
    assert second["nested"] == {"a": 1.5, "b": [1, 2]}
    assert read_metrics(tmp_path / "metrics.jsonl", parse_nonfinite=False)[1]["hi"] == "inf"


def test_to_jsonable_modes():
    assert to_jsonable({"x": float("nan")}, nonfinite="keep")["x"] != to_jsonable({"x": 0.0})["x"]
    assert to_jsonable({1: np.array([[1, 2]], np.int8)}) == {"1": [[1, 2]]}
    assert to_jsonable(object()).startswith("<object")
    with pytest.raises(TypeError, match="a/b: object is not JSON"):
        to_jsonable({"b": object()}, strict=True, _path="a")


def test_truncated_last_line_is_tolerated_and_cut_before_appending(tmp_path, caplog):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, "train", {"r": 0.1})
        writer.write(2, "train", {"r": 0.2})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "kind": "tr')  # the writer was killed mid-record
    with caplog.at_level(logging.WARNING, logger="fst_jax.runtime.metrics"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert any("truncated last record" in r.getMessage() for r in caplog.records)

    with MetricsWriter(tmp_path, tensorboard=False) as writer:  # plain append: cuts the partial line first
        writer.write(3, "train", {"r": 0.3})
    assert [r["step"] for r in _strict_json_lines(path)] == [1, 2, 3]

    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{garbage", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed metrics record"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nope")


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(6):
            writer.write(step, "train", {"r": step / 10})
        writer.write(5, "eval", {"val/reward": 0.5})
    with MetricsWriter(tmp_path, resume_step=3, tensorboard=False) as writer:
        writer.write(4, "train", {"r": 0.44})
    records = read_metrics(tmp_path)
    assert [(r["step"], r["r"]) for r in records] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.44)]
    with MetricsWriter(tmp_path, resume_step=-1, tensorboard=False):  # restart with no checkpoint
        pass
    assert read_metrics(tmp_path) == []


def test_only_process_zero_writes(tmp_path):
    writer = MetricsWriter(tmp_path, process_index=1)
    assert writer.write(1, "train", {"r": 1.0}) is None
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_mirror_and_redaction(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricsWriter(tmp_path) as writer:
        rec = writer.write(1, "train", {"train/reward": 0.5, "token_entropy": 1.25, "loss": float("nan")},
                           api_key="sk-abcdefghijklmnopqrstuvwxyz", note="ok")
    assert rec["api_key"] == "<redacted>" and rec["token_entropy"] == 1.25 and rec["note"] == "ok"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    blob = events[0].read_bytes()
    for tag in (b"train/reward", b"train/token_entropy", b"train/loss"):
        assert tag in blob
    assert b"abcdefghijklmnop" not in (tmp_path / "metrics.jsonl").read_bytes()


def test_save_json_artifacts(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        path = writer.save_json("gepa/cycle_0001.json", {"population": ["a", "b"], "scores": np.array([0.5, 1.0]),
                                                         "lm": {"api_key": "hunter2-hunter2"}})
        with pytest.raises(ValueError, match="outside the workdir"):
            writer.save_json("../escape.json", {})
    assert path == tmp_path / "gepa" / "cycle_0001.json"
    assert json.loads(path.read_text()) == {"population": ["a", "b"], "scores": [0.5, 1.0],
                                            "lm": {"api_key": "<redacted>"}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["cycle_0001.json"]
    assert MetricsWriter(tmp_path, process_index=1).save_json("x.json", {}) is None


def test_progress_is_quiet_off_a_terminal():
    bar = progress(range(3), total=3, desc="steps")  # pytest captures stderr: not a TTY
    assert bar.disable and list(bar) == [0, 1, 2]
    forced = progress(total=5, enabled=True, file=io.StringIO())
    assert not forced.disable
    forced.update(2)
    assert forced.n == 2
    forced.close()


# -- launch/plot.py ---------------------------------------------------------------------------------------
def _load_plot():
    spec = importlib.util.spec_from_file_location("fst_plot", ROOT / "launch" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _fake_run(workdir, method, speed, peak, tasks=("codeio",)):
    """A run whose val/reward follows a sigmoid in steps; `speed` > 1 learns faster."""
    rl_per_step, gepa_per_cycle = 64, (96 if method == "fst" else 0)
    with MetricsWriter(workdir, tensorboard=False) as writer:
        for step in range(0, 121, 10):
            task = tasks[min(step * len(tasks) // 121, len(tasks) - 1)]
            reward = 0.1 + (peak - 0.1) / (1 + (40 / max(step * speed, 1e-9)) ** 2)
            writer.write(step, "eval", {"val/reward": reward, "val/reward_seed": reward * 0.8,
                                        "kl_to_base": 0.01 * step / speed},
                         method=method, task=task, rl_rollouts=step * rl_per_step,
                         gepa_rollouts=(step // 10) * gepa_per_cycle)


def test_plot_summary_and_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = _load_plot()
    _fake_run(tmp_path / "fst", "fst", speed=3.0, peak=0.5)
    _fake_run(tmp_path / "rl", "rl", speed=1.0, peak=0.45)
    out = tmp_path / "figs" / "cmp.png"
    assert plot.main([str(tmp_path / "fst"), str(tmp_path / "rl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "figs" / "cmp_stages.png").exists()
    assert "reference: rl" in printed
    fst_line = next(line for line in printed.splitlines() if line.startswith("fst "))
    # RL's peak (0.415 at step 120) is reached by the faster run at step 30, after 30*64 + 3*96 rollouts.
    rl_line = next(line for line in printed.splitlines() if line.startswith("rl "))
    assert " 30 (4x)" in fst_line and "2208 (3.5x)" in fst_line and "120 (1x)" in rl_line
    xs, ys = plot.series(plot.load_run(str(tmp_path / "fst")).records, "val/reward")
    fit = plot.fit_sigmoid(xs, ys)
    assert fit["a"] == pytest.approx(0.5, abs=1e-3) and fit["b"] == pytest.approx(2.0, abs=1e-2)


def test_plot_continual_stages_and_generic_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = _load_plot()
    _fake_run(tmp_path / "a", "fst", speed=2.0, peak=0.6, tasks=("hover", "codeio", "physics"))
    _fake_run(tmp_path / "b", "rl", speed=1.0, peak=0.4, tasks=("hover", "codeio", "physics"))
    out = tmp_path / "c.png"
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--metrics", "kl_to_base,val/reward_seed",
                      "--labels", "FST,RL", "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "c_stages.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "reward metric: val/reward_seed" in printed and "reference: RL" in printed
    assert [task for task, _ in plot.stages(plot.load_run(str(tmp_path / "a")).records)] == [
        "hover", "codeio", "physics"]
    assert plot.main([str(tmp_path / "missing"), "--out", str(out)]) == 1
