"""The paper's star-graph search experiment: FST on Qwen3-4B-Instruct-2507 (no thinking), K = 8 prompts with
one rollout each (G/K = 1), the rest of configs/fst_qwen3.py's recipe (B = 32, T = 6, GEPA 960 rollouts per
cycle, CISPO, AdamW 1e-6).

    python launch/train.py --config configs/fst_star_graph.py --config.model.path=~/models/Qwen3-4B-Instruct-2507
    python launch/train.py --config configs/fst_star_graph.py --config.method=rl        # the RL-only baseline

The problems are generated from the run's seed (fst_jax/tasks/star_graph.py): 25 arms of 20-node paths over
500 labels, 10,000 for training and 200 for validation. No data files.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path: find the siblings
import fst_qwen3  # noqa: E402


def get_config():
    c = fst_qwen3.get_config()
    c.model.path = "~/models/Qwen3-4B-Instruct-2507"
    c.model.preset = "4B"                  # its shapes, for --dry_run without the checkpoint on disk
    c.model.enable_thinking = False        # an instruct (non-thinking) model
    c.tasks = {"star": dict(task="star_graph", options={"degree": 25, "path_length": 20, "num_nodes": 500,
                                                        "reward": "exact"},
                            num_train=10_000, num_val=200, train_files="")}
    c.task = "star"
    c.cycle.rollouts_per_problem = 8       # G
    c.cycle.population_size = 8            # K: G/K = 1 rollout per prompt per problem
    c.total_steps = 300                    # the paper: FST leaves zero reward at ≈ step 50, RL at ≈ step 250
    return c
