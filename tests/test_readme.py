"""Every `python launch/…` command README.md and the docs/*.md pages show, run as written — so docs that drift
from the code fail.

Commands come from the pages' ```bash blocks (continuation lines joined, `&&` chains split) and from inline
`python launch/…` code spans. Each must match one row of `ROWS`, the substitution table:

- a *run* row names what stands in for what this machine lacks: the 8B checkpoint becomes the tiny model the
  project ships (`--config.model.path=…/assets/tiny-qwen3`, the documented override), the user's data become
  the test data, and small sizes are appended (one RL step, a small GEPA budget, short generations) — the
  command's own flags are kept as written;
- a *skip* row says why the command cannot run here (a 52-minute training, a benchmark), listed in pytest's
  summary as a skip with that reason.

A new README command that matches no row fails the test: add a row (usually a run row with the extra flags
it needs). Commands run in a scratch directory holding links to the repo's `launch`, `configs`, `assets` and
`fst_jax`, so their default outputs (`runs/<config>-<method>`) land there, in README order: a later command
can read an earlier one's outputs, as `launch/plot.py` reads the training runs. Each test also passes alone:
a command that reads runs another command makes (`launch/plot.py runs/…`) first runs that command when its
workdir is missing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(ROOT, "assets", "tiny-qwen3")
MATH = os.path.join(ROOT, "tests", "data", "math_small.jsonl")

# One RL step on 2 problems × 4 rollouts, a population of 2, an 8-rollout GEPA budget, short generations, one
# evaluation on 2 problems: every component of a training run runs, in seconds once compiled.
SMALL_TRAINING = (
    "--config.total_steps=1", "--config.cycle.rl_steps=1", "--config.cycle.problems_per_step=2",
    "--config.cycle.rollouts_per_problem=4", "--config.cycle.population_size=2", "--config.gepa.budget_rollouts=8",
    "--config.gepa.reflection.max_new_tokens=8", "--config.sampling.max_new_tokens=8",
    "--config.eval.at_start=False", "--config.eval.num_problems=2", "--config.eval.k=1",
    "--config.eval.max_new_tokens=8", "--config.eval.kl_prompts=1", "--config.eval.kl_max_new_tokens=8",
    "--config.log.progress=False")
# configs/fst_qwen3.py on the tiny model: float32 on the CPU, micro-batches and chunks that fit 8 rollouts,
# the test data (Polaris names its answer field "answer"; the test file calls it "solution").
QWEN3_ON_TINY = (
    f"--config.model.path={TINY_MODEL}", "--config.model.dtype=float32", "--config.rl.micro_batch_size=8",
    "--config.rl.logprob_chunk_size=64", "--config.tasks.math.fields.answer=solution",
    "--config.gepa.max_prompt_chars=200")


@dataclasses.dataclass(frozen=True)
class Row:
    """How to run (or why to skip) the README commands matching `pattern` (a regex searched in the command)."""

    pattern: str
    skip: str = ""                                 # non-empty: the reason this command cannot run here
    replace: tuple[tuple[str, str], ...] = ()       # (text in the command, what stands in for it)
    extra: tuple[str, ...] = ()                     # arguments appended
    timeout: int = 600


ROWS = (
    # commands that only run as a group or on a cluster (first: they would also match the rows below)
    Row(r"--coordinator_address=127\.0\.0\.1", skip="one of the two processes of the README's 2-process run: "
        "tests/test_multihost.py starts both together (a single one waits for its peer)"),
    Row(r"^srun |/shared/|/mnt/shared/", skip="a SLURM job / TPU-pod worker command: needs the cluster"),
    Row(r"--dry_run", skip="the 8B plan: tests/test_plan.py runs this command (test_qwen3_8b_plan_fits_on_8x80gb)"),
    Row(r"launch/train\.py --config configs/fst_tiny\.py$", extra=SMALL_TRAINING + ("--noplot",)),
    Row(r"launch/train\.py --config configs/fst_tiny_coupling\.py", extra=SMALL_TRAINING + (
        "--noplot", "--workdir=runs/readme-{index}")),
    # other runs of the tiny config (e.g. another task): their own workdir, as the first run above used the
    # default one ({index} is the command's position in the README)
    Row(r"launch/train\.py --config configs/fst_tiny\.py ", extra=SMALL_TRAINING + (
        "--noplot", "--workdir=runs/readme-{index}")),
    Row(r"--config(\.init_from=| )?\S*runs/math-|configs/fst_qwen3_(math|hover)\.py|launch/plot\.py runs/probe-from",
        skip="the plasticity probe: four chained runs of the 8B recipe, two of them on HoVer with its Wikipedia "
             "corpus (too long for CI; the configs themselves are built and validated by the task tests)"),
    # the mesh example gets its own workdir: in the README's one it would find the run above finished
    Row(r"launch/train\.py --config configs/fst_qwen3\.py --config\.mesh\.",
        extra=QWEN3_ON_TINY + SMALL_TRAINING + ("--config.tasks.math.train_files=" + MATH,
                                                "--config.tasks.math.val_files=" + MATH, "--noplot",
                                                "--workdir=runs/fst_qwen3-mesh")),
    Row(r"launch/train\.py --config configs/fst_qwen3\.py",
        replace=(("~/models/Qwen3-8B", TINY_MODEL), ("~/data/polaris/train.jsonl", MATH),
                 ("~/data/polaris/val.jsonl", MATH)),
        extra=QWEN3_ON_TINY + SMALL_TRAINING + ("--config.tasks.math.train_files=" + MATH,
                                                "--config.tasks.math.val_files=" + MATH, "--noplot")),
    Row(r"launch/plot\.py "),
    Row(r"launch/load_example\.py", replace=(("~/models/Qwen3-8B", TINY_MODEL),)),
    Row(r"launch/compare\.py", skip="twenty training runs (≈1.5 hours on 2 CPU cores)"),
    Row(r"tools/make_tiny_model\.py", skip="trains the tiny model for 52 minutes and would overwrite assets/"),
    Row(r"launch/bench\.py sampler --gpu", skip="needs an accelerator"),
    Row(r"launch/bench\.py gpu", skip="needs an accelerator (tests/test_bench_gpu.py runs it with --allow-cpu on "
                                      "tiny shapes)"),
    Row(r"launch/bench\.py", skip="a benchmark against transformers at a 151,936-word vocabulary: minutes of "
                                  "CPU, and its numbers are measured, not asserted"),
)


def readme_commands(text: str) -> list[str]:
    """Every `python launch/…` command of a README, in order, with shell comments and line continuations gone."""
    blocks, prose, block, language = [], [], None, ""
    for line in text.splitlines(keepends=True):  # fences are whole lines (prose may mention ``` too)
        if line.startswith("```"):
            if block is None:
                block, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh", "shell", "console", "text"):  # not python, json...
                    blocks.append("".join(block))
                block = None
        elif block is None:
            prose.append(line)
        else:
            block.append(line)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = re.sub(r"\s+#.*$", "", part).strip()
                if re.search(r"(^|[\s/])python3? (launch|tools)/", part):
                    commands.append(" ".join(part.split()))
    commands += [" ".join(c.split()) for c in re.findall(r"`((?:\S*/)?python3? (?:launch|tools)/[^`]+)`",
                                                         "".join(prose))]
    return list(dict.fromkeys(commands))


def row_for(command: str) -> Row:
    matches = [row for row in ROWS if re.search(row.pattern, command)]
    if not matches:
        pytest.fail(f"README command {command!r} matches no row of ROWS in tests/test_readme.py: add one "
                    "(how to run it here, or why it cannot run)")
    return matches[0]


PAGES = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                               if n.endswith(".md"))


def _page_commands() -> dict[str, str]:
    """{command: the first page that shows it}, README first, then docs/ in name order."""
    found: dict[str, str] = {}
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            for command in readme_commands(f.read()):
                found.setdefault(command, page)
    return found


SOURCE = _page_commands()
COMMANDS = list(SOURCE)


def test_the_readme_shows_the_commands_this_test_knows():
    assert len(COMMANDS) >= 9, COMMANDS  # the extraction itself still works on the pages' layout
    assert any("configs/fst_tiny.py" in c for c in COMMANDS) and any("launch/plot.py" in c for c in COMMANDS)
    assert {SOURCE[c] for c in COMMANDS} >= {"README.md", "docs/tasks.md", "docs/meshes.md"}
    for command in COMMANDS:
        row_for(command)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, jax_cache_env):
    """A directory that looks like the repo's root to the commands, so their outputs stay out of the repo."""
    d = tmp_path_factory.mktemp("readme")
    for name in ("launch", "tools", "configs", "assets", "fst_jax"):
        os.symlink(os.path.join(ROOT, name), d / name)
    env = dict(os.environ, PYTHONPATH=ROOT, **jax_cache_env)
    return d, env


def _argv(command: str) -> list[str]:
    """The command as this test runs it: the row's stand-ins replaced, its extra arguments appended."""
    row = row_for(command)
    as_written = command
    for old, new in row.replace:
        command = command.replace(old, new)
    extra = [a.replace("{index}", str(COMMANDS.index(as_written))) for a in row.extra]
    args = command.split()
    program = args.index(next(a for a in args if a.startswith(("launch/", "tools/"))))
    return [*args[program:], *extra]


def _workdir(argv: list[str]) -> str | None:
    """Where a `launch/train.py` command writes: its last --workdir, else runs/<config name>-<method>."""
    if argv[0] != "launch/train.py":
        return None
    value = lambda flag, default: next((a.split("=", 1)[1] for a in reversed(argv)  # noqa: E731
                                        if a.startswith(flag + "=")), default)
    workdirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--workdir"]
    explicit = value("--workdir", workdirs[-1] if workdirs else None)
    config = argv[argv.index("--config") + 1] if "--config" in argv else value("--config", "")
    stem = os.path.splitext(os.path.basename(config))[0]
    return explicit or f"runs/{stem}-{value('--config.method', 'fst')}"


def _run(argv: list[str], cwd, env, timeout: int) -> None:
    cmd = [sys.executable, *argv]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stderr[-3000:]}"


def _make_missing_runs(argv: list[str], cwd, env) -> None:
    """Run the commands that make the `runs/…` directories `argv` reads, when they are not there yet."""
    for path in [a for a in argv[1:] if a.startswith("runs/")]:
        if os.path.isdir(os.path.join(cwd, path)):
            continue
        maker = next((c for c in COMMANDS if not row_for(c).skip and _workdir(_argv(c)) == path), None)
        assert maker is not None, f"no command of the docs makes {path}, which {' '.join(argv)} reads"
        _run(_argv(maker), cwd, env, row_for(maker).timeout)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, scratch):
    row = row_for(command)
    if row.skip:
        pytest.skip(f"{SOURCE[command]} command {command!r}: {row.skip}")
    cwd, env = scratch
    argv = _argv(command)
    if argv[0] == "launch/plot.py":
        _make_missing_runs(argv, cwd, env)
    _run(argv, cwd, env, row.timeout)
