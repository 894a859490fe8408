"""The paper's Math experiment: FST on Polaris with Qwen3-8B (configs/fst_qwen3.py's recipe and mesh).

    python launch/train.py --config configs/fst_qwen3_math.py \\
        --config.model.path=~/models/Qwen3-8B --config.tasks.math.train_files=~/data/polaris/train.jsonl
    python launch/train.py --config configs/fst_qwen3_math.py --config.method=rl      # the RL-only baseline

Polaris (POLARIS-Project/Polaris-Dataset-53K) as JSON Lines with `problem` and `answer` fields; 1% of it is
held out for validation (mean@4). Only the task differs from configs/fst_qwen3.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path: find the siblings
import fst_qwen3  # noqa: E402


def get_config():
    c = fst_qwen3.get_config()
    c.tasks = {"math": dict(task="math", train_files="~/data/polaris/train.jsonl", val_files="", val_fraction=0.01,
                            fields={"question": "problem", "answer": "answer"}, options={})}
    c.task = "math"
    return c
