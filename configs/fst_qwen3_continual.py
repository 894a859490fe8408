"""The paper's continual-learning run: one FST run on Qwen3-8B through HoVer-hard → CodeIO → Physics, 200 RL
steps each, from a task-agnostic seed prompt (configs/fst_qwen3.py's recipe). The prompt population carries
over each task switch, so GEPA finds out by itself that the task changed; `--config.gepa.reset_on_task_switch=True`
restarts every task from the seed prompt instead (the ablation).

    python launch/train.py --config configs/fst_qwen3_continual.py --config.model.path=~/models/Qwen3-8B
    python launch/train.py --config configs/fst_qwen3_continual.py --config.method=rl   # the RL-only baseline

Each task is evaluated at every evaluation while another trains (forgetting). Data: HoVer as in
configs/fst_qwen3_hover.py, CodeIO as in configs/fst_qwen3.py, Physics as JSON Lines with `problem` and
`answer` (numeric, units allowed; 5% held out). Only the tasks and the schedule differ from fst_qwen3.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path: find the siblings
import fst_qwen3  # noqa: E402
import fst_qwen3_hover  # noqa: E402

from fst_jax.config import SEED_PROMPT  # noqa: E402


def get_config():
    c = fst_qwen3.get_config()
    codeio = c.tasks.codeio.to_dict()
    c.tasks = {
        "hover": fst_qwen3_hover.hover_task(),
        "codeio": codeio,
        "physics": dict(task="physics", train_files="~/data/physics/train.jsonl", val_files="", val_fraction=0.05,
                        fields={"question": "problem", "answer": "answer"}, options={"rel_tol": 1e-2}),
    }
    c.schedule = "hover:200,codeio:200,physics:200"
    c.total_steps = 600
    c.task = "hover"
    c.forgetting_tasks = "hover,codeio,physics"
    c.gepa.seed_prompt = SEED_PROMPT  # task-agnostic: the run starts from it (and restarts, if reset_on_task_switch)
    return c
