"""The run configuration: one `ml_collections.ConfigDict` whose defaults are the paper's recipe ("Learning, Fast and
Slow", arXiv 2605.12484; README "Training").

`configs/*.py` files start from `default_config()` and change what differs (the checkpoint, the data, the
mesh, sizes). Every field is read by `fst_jax.trainer.runner` or the modules it configures; `validate` checks the
fields that code cannot check locally, with messages that name the field.
"""

from __future__ import annotations

import ml_collections

METHODS = ("fst", "rl", "gepa")

SEED_PROMPT = ("You are a careful problem solver. Think step by step, check your work, and give the final "
               "answer in the format the problem asks for.")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "fst"                    # fst | rl (population fixed to the seed prompt) | gepa (weights frozen)
    c.seed = 0
    c.total_steps = 200                 # RL steps (for method=gepa: steps of the same schedule, weights frozen)
    c.init_from = ""                    # another run's workdir: start from its latest params (plasticity probe)

    c.model = ml_collections.ConfigDict()
    c.model.path = ""                   # local HF Qwen3 directory (config.json, safetensors, tokenizer)
    c.model.preset = ""                 # "0.6B" … "32B": model shapes for --dry_run when model.path has no config.json
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "dots_saveable"
    # auto: cuDNN's fused attention on a CUDA GPU for the update and KL forwards (bf16/fp16), einsums elsewhere
    # (CPU, TPU, the sampler's cached prefill) | xla (einsums) | cudnn (or an error) | dot_product (jax.nn's)
    c.model.attention = "auto"
    c.model.enable_thinking = False     # Qwen3 chat template switch

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Per-device memory the plan (--dry_run) checks against; None = what the devices report, else 80.
    c.mesh.device_memory_gb = ml_collections.config_dict.placeholder(float)

    # One entry per task; `schedule` picks which task trains when. Files are local JSONL/Parquet.
    c.tasks = ml_collections.ConfigDict()
    c.tasks.math = ml_collections.ConfigDict(dict(
        train_files="", val_files="", val_fraction=0.0, fields=ml_collections.ConfigDict(), options={}))
    c.task = "math"                     # the task trained on when `schedule` is empty
    c.schedule = ""                     # continual learning: "hover:200,codeio:200,physics:200" (task:steps)
    c.forgetting_tasks = ""             # comma-separated other tasks evaluated for forgetting

    c.cycle = ml_collections.ConfigDict()
    c.cycle.rl_steps = 6                # paper: T: RL steps per cycle; GEPA's window is the next T batches
    c.cycle.problems_per_step = 32      # B
    c.cycle.rollouts_per_problem = 8    # G
    c.cycle.population_size = 4         # K (must divide G)
    # the K prompts come from the Pareto front: "front" = every candidate best (ties included) on some window
    # problem; "nondominated" = those left after the gepa package's remove_dominated (a prompt that is best only
    # where others tie it, e.g. the seed prompt tied at zero, is dropped). GEPA's own search is the same either way.
    c.cycle.population_rule = "front"
    # GEPA's evaluation rollouts of (window problem, population prompt) pairs stand in for RL rollouts of the
    # same pairs in the cycle's steps (off by default); one sampled more than `reuse_max_staleness` updates
    # before the step that would use it is not reused (CISPO's importance ratio corrects what is reused).
    c.cycle.reuse_gepa_rollouts = False
    c.cycle.reuse_max_staleness = 3

    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0        # rollouts (RL and GEPA evaluations)
    c.sampling.top_p = 1.0
    c.sampling.top_k = 0
    c.sampling.max_new_tokens = 4096
    c.sampling.max_prompt_tokens = 1024  # longest rendered prompt (system + problem); a longer one is an error
    # Shortest prompt expected: --dry_run also compiles every smaller prompt bucket down to this one (None: the
    # plan compiles the largest bucket only, and the run compiles smaller ones when it first meets them).
    c.sampling.min_prompt_tokens = ml_collections.config_dict.placeholder(int)
    # The sampler's slots: rows (prompts × samples) in flight at once, over the whole mesh (a multiple of data ×
    # fsdp); a call with more rows streams them through as rows finish. None = B·G, one RL step's rollouts.
    c.sampling.slots = ml_collections.config_dict.placeholder(int)
    # How a token is drawn: "gumbel" (Gumbel-max) or "inverse_cdf" (one uniform per row: a little cheaper on a
    # CPU with a large vocabulary). Same distribution, different noise (fst_jax/sampling/token_choice.py).
    c.sampling.draw = "gumbel"
    # The largest prefill attention score block, in MB over all devices (float32 [prompts, heads, chunk,
    # prompt bucket]): where the whole prompt's scores would be larger, each layer scores its queries in chunks,
    # one after another (the flagship's 8,192-token reflection prompts: chunks of 128 queries).
    c.sampling.prefill_scores_mb = 2048

    c.rl = ml_collections.ConfigDict()
    c.rl.loss = "cispo"                 # paper (the slow-weight recipe) from here to warmup_steps
    c.rl.tau = 4.0
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.28
    c.rl.kl_coef = 1e-3
    c.rl.kl_estimator = "k3"
    c.rl.aggregation = "seq_mean_token_mean"
    c.rl.learning_rate = 1e-6
    c.rl.b1 = 0.9
    c.rl.b2 = 0.999
    c.rl.weight_decay = 0.0
    c.rl.warmup_steps = 10
    c.rl.max_grad_norm = ml_collections.config_dict.placeholder(float)  # None = no clipping
    c.rl.micro_batch_size = ml_collections.config_dict.placeholder(int)
    c.rl.logprob_chunk_size = ml_collections.config_dict.placeholder(int)
    # The update computes each micro-batch of rows (sorted by length) at the smallest of this many evenly spaced
    # lengths up to max_prompt + max_new_tokens that holds it: one compiled gradient program per length.
    c.rl.num_length_buckets = 10

    c.gepa = ml_collections.ConfigDict()
    c.gepa.seed_prompt = SEED_PROMPT
    c.gepa.budget_rollouts = 960        # paper (≈): metric calls per cycle (≈5 passes over the 192-problem window)
    c.gepa.minibatch_size = 3
    c.gepa.proposals_per_iteration = 8
    c.gepa.selection = "pareto"         # pareto | current_best | epsilon_greedy (gepa/selection.py)
    c.gepa.epsilon = 0.1
    c.gepa.acceptance = "strict_improvement"   # | improvement_or_equal (gepa/acceptance.py)
    c.gepa.component_selection = "round_robin"  # | all: which prompt components one reflection rewrites
    c.gepa.use_merge = False
    c.gepa.max_merge_invocations = 5
    c.gepa.merge_items = 5
    c.gepa.seed_scoring_passes = 1.0    # the carried-over population shares this many passes over the window
    c.gepa.population_fill = "repeat"   # front < K: repeat front members by rank | "dominated": top up (ablation)
    c.gepa.reset_on_task_switch = False  # True: a new task restarts from the seed prompt (ablation)
    c.gepa.max_iterations_without_improvement = ml_collections.config_dict.placeholder(int)
    c.gepa.max_prompt_chars = 4000
    c.gepa.reflection_template = ""     # "" = the built-in template (asks for small incremental edits)
    c.gepa.reflection = ml_collections.ConfigDict()
    c.gepa.reflection.kind = "local"    # local (the frozen base model) | openai (any compatible endpoint)
    c.gepa.reflection.temperature = 0.7
    c.gepa.reflection.max_new_tokens = 1024
    c.gepa.reflection.max_prompt_tokens = 8192  # local reflection: longest prompt (template + records)
    c.gepa.reflection.base_url = "http://127.0.0.1:8000/v1"
    c.gepa.reflection.model = ""
    c.gepa.reflection.api_key_env = "OPENAI_API_KEY"   # the NAME of the variable; the key never enters a log
    c.gepa.reflection.timeout_s = 120.0
    c.gepa.reflection.max_retries = 5
    c.gepa.reflection.max_concurrency = 8
    c.gepa.reflection.max_consecutive_failures = 3  # failed reflection calls in a row before the run stops
    c.gepa.reflection.options = {}      # keyword arguments of a kind added with gepa.register_reflection_lm

    c.eval = ml_collections.ConfigDict()
    c.eval.at_start = True              # evaluate the base model before the first step
    c.eval.every = 12                   # RL steps (rounded to cycle ends); 0 = only at the end
    c.eval.k = 4                        # paper: mean@4 at temperature 0.6, top-p 0.95
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    c.eval.max_new_tokens = 4096
    c.eval.num_problems = 0             # 0 = the whole validation split
    c.eval.kl_prompts = 32              # held-out prompts for KL(π_θ ‖ π_base); 0 = off
    c.eval.kl_max_new_tokens = 512

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_cycles = 1
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True
    c.log.progress = True
    # Weights & Biases beside metrics.jsonl and TensorBoard, from process 0 (pip install '.[wandb]'; docs/training.md)
    c.log.wandb = ml_collections.ConfigDict()
    c.log.wandb.enabled = False
    c.log.wandb.project = "fst_jax"
    c.log.wandb.entity = ""             # "" = your default W&B entity
    c.log.wandb.name = ""               # "" = the workdir's name; a resume continues its run (WORKDIR/wandb_run.json)
    c.log.wandb.mode = ""               # "" = W&B's choice ($WANDB_MODE, else online) | online | offline | disabled

    # The cost the dry run predicts (--dry_run → plan.json "cost"; fst_jax/trainer/cost_model.py).
    c.plan = ml_collections.ConfigDict()
    c.plan.device = "H100"              # H100 | H200 | TPU v5p: the roofline's peaks (cost_model.DEVICES)
    c.plan.mean_answer_tokens = ml_collections.config_dict.placeholder(int)  # None = sampling.max_new_tokens / 2
    c.plan.compute_efficiency = 0.4     # fraction of the bf16 peak a matmul-bound program reaches (assumed)
    c.plan.bandwidth_efficiency = 0.7   # fraction of HBM bandwidth a memory-bound decode step reaches (assumed)
    c.plan.eval_problems = 500          # problems per evaluation when eval.num_problems = 0 (the split's size)
    # True: compile every program a run can call (a run after its plan then compiles nothing: the persistent
    # cache holds them). False: compile the ones the memory table and the cost need, lower the rest (at 8B on
    # a 2-core CPU each engine program takes ~10 s to compile; lowering shows the shapes hold).
    c.plan.compile_all = True
    return c


def parse_schedule(config) -> list[tuple[str, int]]:
    """[(task, rl_steps), ...]: `config.schedule` ("a:200,b:200") or the single `config.task` for all steps."""
    text = str(config.schedule or "").strip()
    if not text:
        return [(config.task, int(config.total_steps))]
    out = []
    for part in text.split(","):
        name, _, steps = part.strip().partition(":")
        if not name or not steps.strip().isdigit() or int(steps) <= 0:
            raise ValueError(f"config.schedule entry {part!r} must look like 'task:steps' with steps > 0")
        out.append((name, int(steps)))
    return out


def _check_range(config, path: str, low=None, high=None, *, low_open=False, high_open=False, optional=False,
                 integer=False) -> None:
    """`config.<path>` is a number in the interval; the error names the full path and the allowed range."""
    node = config
    for part in path.split("."):
        if part not in node:
            return  # a field a config file removed: the code that reads it reports it
        node = node[part]
    if node is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok = isinstance(node, (int, float)) and not isinstance(node, bool) and (not integer or isinstance(node, int))
    ok = ok and node == node  # NaN
    if ok and low is not None:
        ok = node > low if low_open else node >= low
    if ok and high is not None:
        ok = node < high if high_open else node <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '≥'} {low}"
        hi = "" if high is None else f"{'<' if high_open else '≤'} {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"config.{path} must be {kind}{' ' + bounds if bounds else ''}, got {node!r}")


# (path, low, high, options): every numeric field that has a meaningful range.
_RANGES = (
    ("total_steps", 1, None, dict(integer=True)),
    ("cycle.rl_steps", 1, None, dict(integer=True)),
    ("cycle.problems_per_step", 1, None, dict(integer=True)),
    ("cycle.rollouts_per_problem", 1, None, dict(integer=True)),
    ("cycle.population_size", 1, None, dict(integer=True)),
    ("cycle.reuse_max_staleness", 0, None, dict(integer=True)),
    ("sampling.temperature", 0, None, {}),
    ("sampling.top_p", 0, 1, dict(low_open=True)),
    ("sampling.top_k", 0, None, dict(integer=True)),
    ("sampling.max_new_tokens", 1, None, dict(integer=True)),
    ("rl.tau", 0, None, dict(low_open=True)),
    ("rl.eps_low", 0, None, {}),
    ("rl.eps_high", 0, None, {}),
    ("rl.kl_coef", 0, None, {}),
    ("rl.learning_rate", 0, None, dict(low_open=True)),
    ("rl.b1", 0, 1, dict(high_open=True)),
    ("rl.b2", 0, 1, dict(high_open=True)),
    ("rl.weight_decay", 0, None, {}),
    ("rl.warmup_steps", 0, None, dict(integer=True)),
    ("rl.max_grad_norm", 0, None, dict(low_open=True, optional=True)),
    ("rl.micro_batch_size", 1, None, dict(integer=True, optional=True)),
    ("rl.logprob_chunk_size", 1, None, dict(integer=True, optional=True)),
    ("rl.num_length_buckets", 1, None, dict(integer=True)),
    ("gepa.budget_rollouts", 1, None, dict(integer=True)),
    ("gepa.minibatch_size", 1, None, dict(integer=True)),
    ("gepa.proposals_per_iteration", 1, None, dict(integer=True)),
    ("gepa.epsilon", 0, 1, {}),
    ("gepa.max_merge_invocations", 0, None, dict(integer=True)),
    ("gepa.max_iterations_without_improvement", 1, None, dict(integer=True, optional=True)),
    ("gepa.max_prompt_chars", 1, None, dict(integer=True)),
    ("gepa.reflection.temperature", 0, None, {}),
    ("gepa.reflection.max_new_tokens", 1, None, dict(integer=True)),
    ("gepa.reflection.timeout_s", 0, None, dict(low_open=True)),
    ("gepa.reflection.max_retries", 0, None, dict(integer=True)),
    ("gepa.reflection.max_concurrency", 1, None, dict(integer=True)),
    ("eval.every", 0, None, dict(integer=True)),
    ("eval.k", 1, None, dict(integer=True)),
    ("eval.temperature", 0, None, {}),
    ("eval.top_p", 0, 1, dict(low_open=True)),
    ("eval.max_new_tokens", 1, None, dict(integer=True)),
    ("eval.num_problems", 0, None, dict(integer=True)),
    ("eval.kl_prompts", 0, None, dict(integer=True)),
    ("eval.kl_max_new_tokens", 1, None, dict(integer=True)),
    ("checkpoint.every_cycles", 1, None, dict(integer=True)),
    ("checkpoint.max_to_keep", 1, None, dict(integer=True, optional=True)),
    ("plan.mean_answer_tokens", 1, None, dict(integer=True, optional=True)),
    ("plan.compute_efficiency", 0, 1, dict(low_open=True)),
    ("plan.bandwidth_efficiency", 0, 1, dict(low_open=True)),
    ("plan.eval_problems", 1, None, dict(integer=True)),
)


def _choices() -> dict[str, tuple[str, ...]]:
    """path → allowed values, read from the modules that implement them (imported here, not at the top, so
    that config files stay cheap to import)."""
    from fst_jax.gepa.selection import SELECTORS
    from fst_jax.gepa.state import POPULATION_RULES
    from fst_jax.models.config import ATTENTION_KERNELS, REMAT_POLICIES
    from fst_jax.rl.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
    from fst_jax.trainer.cost_model import DEVICES

    dtypes = ("float32", "bfloat16", "float16")
    return {"model.dtype": dtypes, "model.param_dtype": dtypes, "model.remat": REMAT_POLICIES,
            "model.attention": tuple(ATTENTION_KERNELS),
            "rl.loss": tuple(POLICY_LOSSES), "rl.kl_estimator": tuple(KL_ESTIMATORS), "rl.aggregation": AGGREGATIONS,
            "gepa.selection": SELECTORS, "cycle.population_rule": POPULATION_RULES, "gepa.reflection.kind": ("local", "openai"), "plan.device": tuple(DEVICES)}


def _validate_task(name: str, spec) -> None:
    where = f"config.tasks.{name}"
    if not hasattr(spec, "get"):
        raise ValueError(f"{where} must be a dict of task settings (task, train_files, fields, options...), "
                         f"got {type(spec).__name__}")
    fraction = spec.get("val_fraction", 0.0) or 0.0
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"{where}.val_fraction must be a number in [0, 1), got {fraction!r}")
    if fraction and spec.get("val_files"):
        raise ValueError(f"{where} sets both val_files and val_fraction={fraction}: validation comes from "
                         "val_files, so set val_fraction=0 (or drop val_files to split train_files)")
    fields = spec.get("fields")
    for key, value in (fields.items() if hasattr(fields, "items") else ()):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.fields.{key} must be the record key to read it from, got {value!r}")
    for count in ("num_train", "num_val"):
        value = spec.get(count, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}.{count} must be an integer ≥ 0, got {value!r}")


def validate(config, *, require_checkpoint: bool = True) -> None:
    """Checks of every field with a range or a choice, and across fields; each error names the field's full
    path (`config.cycle.rl_steps`) and what to do. A dry run (`require_checkpoint=False`) needs no checkpoint
    directory: `model.preset` may stand in for it."""
    for path, low, high, options in _RANGES:
        _check_range(config, path, low, high, **options)
    for path, allowed in _choices().items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node.get(part, {}) if hasattr(node, "get") else {}
        if hasattr(node, "get") and leaf in node and node[leaf] not in allowed:
            raise ValueError(f"config.{path} must be one of {', '.join(allowed)}; got {node[leaf]!r}")
    if config.method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}")
    for field, value in (("sampling.max_prompt_tokens", config.sampling.max_prompt_tokens),
                         ("gepa.reflection.max_prompt_tokens", config.gepa.reflection.max_prompt_tokens)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"config.{field} must be a positive integer, got {value!r}")
    plan = config.get("plan", {})
    if plan.get("mean_answer_tokens") and plan.mean_answer_tokens > config.sampling.max_new_tokens:
        raise ValueError(f"config.plan.mean_answer_tokens={plan.mean_answer_tokens} exceeds "
                         f"config.sampling.max_new_tokens={config.sampling.max_new_tokens}: an answer's mean "
                         "length is at most its cap")
    if config.sampling.slots is not None and not (isinstance(config.sampling.slots, int) and config.sampling.slots >= 1):
        raise ValueError(f"config.sampling.slots must be a positive integer (or None = B·G), got "
                         f"{config.sampling.slots!r}")
    scores = config.sampling.get("prefill_scores_mb")
    if isinstance(scores, bool) or not (isinstance(scores, (int, float)) and scores > 0):
        raise ValueError(f"config.sampling.prefill_scores_mb must be a positive number of MB, got {scores!r}")
    if config.sampling.draw not in ("gumbel", "inverse_cdf"):
        raise ValueError(f"config.sampling.draw must be 'gumbel' or 'inverse_cdf', got {config.sampling.draw!r}")
    if require_checkpoint and not config.model.path:
        raise ValueError("config.model.path is empty: set it to a local HF Qwen3 directory "
                         "(e.g. --config.model.path=~/models/Qwen3-8B)")
    G, K, T = config.cycle.rollouts_per_problem, config.cycle.population_size, config.cycle.rl_steps
    if K < 1 or G % K:
        raise ValueError(f"config.cycle.population_size K={K} must divide rollouts_per_problem G={G} "
                         "(each prompt gets G/K rollouts of every problem)")
    if T < 1 or config.cycle.problems_per_step < 1:
        raise ValueError("config.cycle.rl_steps and problems_per_step must be ≥ 1")
    if config.gepa.population_fill not in ("repeat", "dominated"):
        raise ValueError(f"config.gepa.population_fill must be 'repeat' or 'dominated', got "
                         f"{config.gepa.population_fill!r}")
    if not config.gepa.seed_scoring_passes > 0:
        raise ValueError(f"config.gepa.seed_scoring_passes must be > 0, got {config.gepa.seed_scoring_passes}")
    if config.gepa.reflection.max_consecutive_failures < 1:
        raise ValueError("config.gepa.reflection.max_consecutive_failures must be ≥ 1")
    schedule = parse_schedule(config)
    for name in config.tasks:
        _validate_task(name, config.tasks[name])
    for name, _ in schedule:
        if name not in config.tasks:
            raise ValueError(f"task {name!r} (from config.schedule/config.task) has no entry in config.tasks; "
                             f"configured: {sorted(config.tasks.keys())}")
    for name in filter(None, (s.strip() for s in str(config.forgetting_tasks).split(","))):
        if name not in config.tasks:
            raise ValueError(f"config.forgetting_tasks names {name!r}, which has no entry in config.tasks")
    if sum(steps for _, steps in schedule) != config.total_steps and config.schedule:
        raise ValueError(f"config.schedule adds up to {sum(s for _, s in schedule)} steps but config.total_steps "
                         f"is {config.total_steps}; make them agree")
    if "wandb" in config.get("log", {}) and require_checkpoint:  # a dry run logs nothing
        _check_wandb(config.log.wandb)


def _check_wandb(settings) -> None:
    """`config.log.wandb` on process 0, the one that logs: the mode, and (when enabled) the package and a login,
    each a one-line error before anything heavy starts."""
    from fst_jax.runtime.wandb_log import check_ready

    if settings.get("enabled"):
        import jax

        if jax.process_index() != 0:
            return
    check_ready(settings)
