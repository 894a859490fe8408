"""The paper's recipe on ONE 80 GB GPU: Qwen3-1.7B, the largest Qwen3 whose plan fits (launch/train.py --dry_run).

    python launch/train.py --config configs/fst_qwen3_1gpu.py --dry_run --workdir runs/plan-1gpu   # the plan
    python launch/train.py --config configs/fst_qwen3_1gpu.py \\
        --config.model.path=~/models/Qwen3-1.7B \\
        --config.tasks.codeio.train_files=~/data/codeio/train.jsonl \\
        --config.tasks.codeio.val_files=~/data/codeio/val.jsonl

Everything is configs/fst_qwen3.py's (B=32, G=8, K=4, T=6, 4096 new tokens, GEPA 960 rollouts per cycle)
except the model and the memory levers. On one device nothing is sharded: fp32 params and Adam's two moments
take 12 bytes a parameter, the bf16 frozen base and the bf16 sampler copy 4 more, so Qwen3-4B's 4.0 B
parameters need 64 GB before any KV cache; Qwen3-1.7B's 2.0 B need 33 GB. The rollouts (256 × 5120 tokens of
KV cache = 150 GB at 28 layers) run in calls of 16 rows, the update in micro-batches of 2 rows.

`python launch/bench.py gpu` runs its update on this model (fp32 params, its remat and attention) at
configs/fst_qwen3.py's per-device regime and prints it beside the cost model's prediction (docs/planning.md,
"What a run costs").
"""

from configs.fst_qwen3 import get_config as flagship


def get_config():
    c = flagship()
    c.model.path = "~/models/Qwen3-1.7B"
    c.model.preset = "1.7B"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.mesh.device_memory_gb = 80.0
    # The plan's levers (launch/train.py --dry_run; first plan: 112 GB peak): 16 sampler slots (≈ 9.4 GB of
    # KV), 2-row update micro-batches (53 GB of temporaries at 4 rows), reflection prompts ≤ 4096 tokens (76 GB
    # of prefill temporaries for 8 × 8192).
    c.sampling.slots = 16
    c.rl.micro_batch_size = 2
    c.gepa.reflection.max_prompt_tokens = 4096
    return c
