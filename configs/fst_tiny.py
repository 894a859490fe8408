"""The embedded default: FST on the tiny Qwen3 the project ships, on CPU, in minutes, with no downloads.

    python launch/train.py --config configs/fst_tiny.py                      # FST
    python launch/train.py --config configs/fst_tiny.py --config.method=rl   # the RL-only baseline
    python launch/train.py --config configs/fst_tiny.py --config.method=gepa # prompts only, weights frozen
    python launch/train.py --config configs/fst_tiny.py \\
        --config.schedule=stage1:24,stage2:24,stage3:24 --config.total_steps=72      # 3 held-out rules in turn

The model (assets/tiny-qwen3, made by tools/make_tiny_model.py) follows string rules stated in its system
prompt and can write a better rule from failure records. The task hides a composed rule the seed prompt does
not state; RL must find it in the weights, GEPA in the prompt, FST in both. The reflection LM is the frozen
base model itself, through our sampler. Every real component runs: HF-format loading, the jitted sampler,
the CISPO update, GEPA, orbax checkpoints.
"""

import os

from fst_jax.config import default_config
from fst_jax.tasks.synthetic import SEED_PROMPT, TINY_REFLECTION_TEMPLATE

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-qwen3")
# Held-out compositions for the continual schedule: never in the tiny model's training data.
CONTINUAL_RULES = ("reverse, then shift 1", "swap pairs, then upper", "rotate 1, then reverse")


def rule_task(rule: str, num_train: int = 512, num_val: int = 32) -> dict:
    """A `config.tasks` entry for the synthetic string-rule task hiding `rule` (configs/fst_tiny_coupling.py
    builds on it)."""
    return dict(task="rule", options={"rule": rule}, num_train=num_train, num_val=num_val, train_files="")


def get_config():
    c = default_config()
    c.seed = 0
    c.model.path = ASSETS
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    c.tasks = {
        "rule": rule_task("reverse, then shift 2"),
        "stage1": rule_task(CONTINUAL_RULES[0]),
        "stage2": rule_task(CONTINUAL_RULES[1]),
        "stage3": rule_task(CONTINUAL_RULES[2]),
        "copy": dict(task="skill", options={"skill": "copy"}, num_train=64, num_val=32, train_files=""),
        "count": dict(task="skill", options={"skill": "count"}, num_train=64, num_val=32, train_files=""),
        # --config.task=star --config.sampling.max_prompt_tokens=256: a small star graph (3 arms, paths of 3
        # nodes, 36 labels; its prompts are ~165 characters), exact-match reward
        "star": dict(task="star_graph", options={"degree": 3, "path_length": 3, "num_nodes": 36, "reward": "exact",
                                                 "instruction": "Give the path after the source in \\boxed{}."},
                     num_train=512, num_val=32, train_files=""),
    }
    c.task = "rule"
    c.forgetting_tasks = "copy,count"
    c.total_steps = 24

    c.cycle.rl_steps = 4
    c.cycle.problems_per_step = 8
    c.cycle.rollouts_per_problem = 8
    c.cycle.population_size = 4

    c.sampling.temperature = 1.0
    c.sampling.max_new_tokens = 16
    # Rendered prompts run 35-125 tokens (system prompts ≤ gepa.max_prompt_chars) and reflection prompts
    # 316-450: the plan compiles the 64 and 128 buckets (and 512 for reflection), the run needs no other.
    c.sampling.max_prompt_tokens = 128
    c.sampling.min_prompt_tokens = 33
    # 128 rows in flight: mean@4 on 32 problems fills them exactly; GEPA's window scoring (32 items × up to 8
    # children) streams through in two waves. At 256, a 128-row evaluation computed 256 rows a step: the run
    # took 62.0 s against 53.8 s at 128 (the records equal but for float rounding).
    c.sampling.slots = 128

    # Micro-batches of 8 rows at 3 planned lengths: 1.2x the real tokens instead of 5.1x with one micro-batch of
    # all 64 rows, and 3 gradient programs to compile instead of 10 (the records equal to fp32 rounding).
    c.rl.micro_batch_size = 8
    c.rl.num_length_buckets = 3
    c.rl.learning_rate = 3e-4
    c.rl.warmup_steps = 2
    c.rl.kl_coef = 1e-3

    c.gepa.seed_prompt = SEED_PROMPT
    c.gepa.reflection_template = TINY_REFLECTION_TEMPLATE
    c.gepa.budget_rollouts = 160
    c.gepa.proposals_per_iteration = 8
    c.gepa.minibatch_size = 3
    c.gepa.max_prompt_chars = 80
    c.gepa.reflection.kind = "local"
    c.gepa.reflection.temperature = 1.0
    c.gepa.reflection.max_new_tokens = 40
    c.gepa.reflection.max_prompt_tokens = 512

    c.eval.every = 4
    c.eval.k = 4
    c.eval.max_new_tokens = 16
    c.eval.kl_prompts = 16
    c.eval.kl_max_new_tokens = 16

    c.checkpoint.max_to_keep = 2
    return c
