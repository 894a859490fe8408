"""The paper's recipe (RECIPE.md) on Qwen3-8B, math, 8 GPUs (FSDP over all of them).

    python launch/train.py --config configs/fst_qwen3.py \\
        --config.model.checkpoint=~/models/Qwen3-8B \\
        --config.tasks.math.train_files=~/data/polaris/train.jsonl \\
        --config.tasks.math.val_files=~/data/polaris/val.jsonl

Every number of the recipe is a field of fst_jax/config.py's `default_config()`, whose defaults are the
published values; this file sets only what is specific to this model and machine.
"""

from fst_jax.config import default_config


def get_config():
    c = default_config()
    c.model.checkpoint = "~/models/Qwen3-8B"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"       # fp32 master weights for AdamW at lr 1e-6; bf16 compute
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.tasks.math.train_files = "~/data/polaris/train.jsonl"
    c.tasks.math.val_files = "~/data/polaris/val.jsonl"
    c.tasks.math.fields = {"question": "problem", "answer": "answer"}
    c.rl.micro_batch_size = 16
    c.rl.logprob_chunk_size = 512
    c.sampling.max_new_tokens = 4096
    c.total_steps = 200
    return c
