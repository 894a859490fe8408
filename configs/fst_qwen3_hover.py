"""The paper's HoVer-hard experiment: FST on multi-hop retrieval with Qwen3-8B (configs/fst_qwen3.py's recipe).

    python launch/train.py --config configs/fst_qwen3_hover.py --config.model.path=~/models/Qwen3-8B
    python launch/train.py --config configs/fst_qwen3_hover.py --config.method=rl     # the RL-only baseline

Data (local files): HoVer's released JSON (`hover_train_release_v1.1.json`, `hover_dev_release_v1.1.json`)
and a corpus of Wikipedia abstracts as JSON Lines with `title` and `text` (a BM25 index is built on first use
and cached beside it, in `<corpus>.bm25s/`). HoVer-hard = claims of 3 or more hops (`min_hops=3`; why in
fst_jax/tasks/hover.py). Only the task differs from configs/fst_qwen3.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path: find the siblings
import fst_qwen3  # noqa: E402


def hover_task(min_hops: int = 3) -> dict:
    """The config.tasks entry for HoVer (HoVer-hard by default)."""
    return dict(task="hover", train_files="~/data/hover/hover_train_release_v1.1.json",
                val_files="~/data/hover/hover_dev_release_v1.1.json", val_fraction=0.0, fields={"id": "uid"},
                options={"corpus": "~/data/hover/wiki_abstracts.jsonl", "corpus_fields": {}, "min_hops": min_hops,
                         "hop1_k": 7, "hop2_k": 10, "reward": "all"})


def get_config():
    c = fst_qwen3.get_config()
    c.tasks = {"hover": hover_task()}
    c.task = "hover"
    return c
