"""Weights & Biases logging (`config.log.wandb`, fst_jax/runtime/wandb_log.py) in W&B's offline mode: no network.

The end-to-end case is a user's: the real `launch/train.py` on the tiny model with W&B on, SIGKILLed while it saves
its last checkpoint (after it logged that step's records), then the same command again. What W&B recorded is
read back from the offline run files themselves (`run-<id>.wandb`: W&B's record log, LevelDB's log format with
a 7-byte W&B header, each record a `wandb_internal_pb2.Record`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fst_jax.config import default_config, validate
from fst_jax.runtime.wandb_log import wandb_metrics

from conftest import TINY_RUN, xla_flags

wandb = pytest.importorskip("wandb", reason="the [wandb] extra is not installed")

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "fst_tiny.py")
SMALL = list(TINY_RUN)  # shared with test_reliability: its programs are in the compilation cache
SECRET = "sk-test-0123456789abcdefghijklmnop"  # an API key in the environment: it must reach no W&B file


# ---- the pieces ------------------------------------------------------------------------------------------

def test_a_record_becomes_a_row_named_as_in_tensorboard():
    row = wandb_metrics({"step": 3, "kind": "train", "time": 17.5, "train/reward": 0.25, "loss": 2, "task": "rule",
                         "grad_norm": "nan", "population": ["a", "b"], "timing": {"update": 1.5}, "resumed": True})
    assert math.isnan(row.pop("train/grad_norm"))
    assert row == {"train/reward": 0.25, "train/loss": 2.0, "timing/update": 1.5, "train/resumed": 1.0,
                   "rl_step": 3}


def _wandb_config(**fields):
    c = default_config()
    c.model.path = "/models/x"
    c.log.wandb.update(fields)
    return c


def test_a_missing_package_or_login_is_one_line_before_the_run_starts(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "no_config"))
    validate(_wandb_config())  # off by default: nothing is checked, nothing needed
    with pytest.raises(ValueError, match=r"^config.log.wandb.enabled=True but W&B has no login here: run `wandb "
                                         r"login` .* --config.log.wandb.mode=offline .*`wandb sync`$"):
        validate(_wandb_config(enabled=True))
    validate(_wandb_config(enabled=True, mode="offline"))
    (tmp_path / "no_netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    validate(_wandb_config(enabled=True))  # `wandb login` wrote the key to ~/.netrc
    with pytest.raises(ValueError, match=r"config.log.wandb.mode must be one of '', 'online', 'offline', "
                                         r"'disabled', got 'cloud'"):
        validate(_wandb_config(mode="cloud"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does without the package
    with pytest.raises(ValueError) as info:
        validate(_wandb_config(enabled=True, mode="offline"))
    assert str(info.value) == ("config.log.wandb.enabled=True but the wandb package is not installed: "
                               "pip install '.[wandb]' (or turn it off: --config.log.wandb.enabled=false)")


def test_a_named_run_logs_each_record_as_one_row(tmp_path):
    """`MetricsWriter` with W&B on, in a process of its own (W&B's console capture and pytest's, in one process,
    lose the run's records)."""
    script = ("from fst_jax.runtime.metrics import MetricsWriter\n"
              "settings = dict(enabled=True, mode='offline', name='a-name', project='p', entity='')\n"
              f"with MetricsWriter({str(tmp_path / 'run')!r}, resume_step=-1, wandb=settings, run_config={{'seed': 3}},"
              " process_index=0) as writer:\n"
              "    writer.write(1, 'train', {'train/reward': 0.5, 'loss': 1.25}, task='rule')\n"
              "    writer.write(1, 'eval', {'val/reward': 0.75})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # files under the workdir
    env.update(PYTHONPATH=str(ROOT), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    seg = segment(run_dir)
    assert seg["name"] == "a-name" and seg["config"]["seed"] == 3
    assert [{k: v for k, v in r.items() if not k.startswith("_") or k == "_step"} for r in seg["rows"]] == [
        {"train/reward": 0.5, "train/loss": 1.25, "rl_step": 1, "_step": 0}, {"val/reward": 0.75, "rl_step": 1,
                                                                              "_step": 1}]
    assert json.loads((tmp_path / "run" / "wandb_run.json").read_text()) == {"id": seg["id"], "project": "p",
                                                                              "rows": 2}


# ---- kill and resume, offline -------------------------------------------------------------------------------

def wandb_records(path: Path):
    """The protobuf records of an offline run's `.wandb` file (LevelDB log blocks of 32 KiB; FULL/FIRST/MIDDLE/
    LAST chunks; a 7-byte ":W&B" header), decoded with the installed wandb's own message types."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos = (pos // block + 1) * block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
            if kind == 1:
                out.append(pending)
        elif kind in (3, 4):
            pending += chunk
            if kind == 4:
                out.append(pending)
    records = []
    for raw in out:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def segment(run_dir: Path) -> dict:
    """One offline run directory as {"id", "config", "rows": [{name: value}, ...] in logging order}."""
    (path,) = run_dir.glob("run-*.wandb")
    seg = {"rows": [], "config": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            seg["id"], seg["name"], seg["entity"] = record.run.run_id, record.run.display_name, record.run.entity
            seg["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            seg["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            seg["rows"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return seg


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, jax_cache_env):
    """A W&B-logged run killed while saving its last checkpoint, then resumed by the same command."""
    tmp = tmp_path_factory.mktemp("wandb")
    workdir, marker, files = tmp / "run", tmp / "saving", tmp / "wandb_files"
    env = dict(os.environ, PWD=str(ROOT), PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags(1),
               **jax_cache_env, WANDB_DIR=str(files),
               WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp / "wandb_data"), OPENAI_API_KEY=SECRET)
    # WANDB_SERVICE: a W&B run made by an earlier test in this process would serve these runs too
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SERVICE", "FST_JAX_TRACEBACK"):
        env.pop(var, None)
    files.mkdir()
    command = ["launch/train.py", "--config", TINY, "--workdir", str(workdir), *SMALL,
               "--config.log.wandb.enabled=true", "--config.log.wandb.mode=offline",
               "--config.log.wandb.project=fst-test", "--config.log.wandb.entity=fst-team",
               "--config.checkpoint.async_save=True"]
    killed = subprocess.Popen([sys.executable, "tests/fault_injection.py", f"stall:2:{marker}", *command], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not marker.exists() and killed.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the save of step 2 never started"
        time.sleep(3)  # W&B writes its run file every second (wandb_log.py); what it has not written is lost
        killed.send_signal(signal.SIGKILL)  # step 2's records are logged; its checkpoint is not written
        killed.wait(30)
    finally:
        if killed.poll() is None:
            killed.kill()
    first_id = json.loads((workdir / "wandb_run.json").read_text())["id"]
    time.sleep(1)  # W&B's service process notices its parent is gone and stops
    resumed = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return dict(workdir=workdir, files=files, first_id=first_id, result=resumed)


def _records(workdir: Path, kind: str) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(resumed_run):
    workdir, run_id = resumed_run["workdir"], resumed_run["first_id"]
    assert json.loads((workdir / "wandb_run.json").read_text())["id"] == run_id
    dirs = sorted((resumed_run["files"] / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(dirs) == 2, dirs  # the killed run's directory and the resumed run's, one W&B run id
    killed, resumed = map(segment, dirs)
    assert killed["id"] == resumed["id"] == run_id
    assert killed["name"] == resumed["name"] == "run" and resumed["entity"] == "fst-team"  # name: the workdir's
    # W&B's rows continue after the killed run's (no row rejected as "step not increasing"; `wandb sync` replays
    # both directories into one run)
    assert min(r["_step"] for r in resumed["rows"]) > max(r["_step"] for r in killed["rows"])
    # the killed run logged step 2 before its checkpoint; metrics.jsonl dropped it and the resumed run logged it
    # again — the same values at the same rl_step, since the resume is exact
    eval_rows = [[r for r in seg["rows"] if "val/reward" in r] for seg in (killed, resumed)]
    assert [r["rl_step"] for r in eval_rows[0]] == [r["rl_step"] for r in eval_rows[1]] == [2]
    final = _records(workdir, "eval")[-1]
    for name, field in (("val/reward", "val/reward"), ("val/reward_seed", "val/reward_seed"),
                        ("eval/kl_to_base", "kl_to_base"), ("forgetting/copy", "forgetting/copy")):
        assert eval_rows[0][0][name] == eval_rows[1][0][name] == final[field], name
    train = {seg_name: {r["rl_step"]: r["train/reward"] for r in seg["rows"] if "train/reward" in r}
             for seg_name, seg in (("killed", killed), ("resumed", resumed))}
    assert train == {"killed": {1: train["killed"][1], 2: train["resumed"][2]}, "resumed": {2: train["resumed"][2]}}
    assert [r["train/reward"] for r in _records(workdir, "train")] == [train["killed"][1], train["resumed"][2]]
    assert [r["rl_step"] for r in resumed["rows"] if "config/resumed" in r] == [1]


@pytest.mark.slow
def test_the_config_is_logged_once_and_redacted(resumed_run):
    run_id = resumed_run["first_id"]
    for run_dir in (resumed_run["files"] / "wandb").glob(f"offline-run-*-{run_id}"):
        config = segment(run_dir)["config"]
        assert config["method"] == "fst" and config["cycle"]["rl_steps"] == 1 and config["log"]["wandb"]["project"] \
            == "fst-test"
        assert config["gepa"]["reflection"]["api_key_env"] == "<redacted>"  # a credential-named field
        assert config["model"]["path"] == str(ROOT / "assets" / "tiny-qwen3")  # a path under $PWD is no secret
    every_file = [p for p in resumed_run["files"].rglob("*") if p.is_file()]
    assert every_file and not [p for p in every_file if SECRET.encode() in p.read_bytes()]
