"""The paper's recipe on Qwen3-8B: Math (Polaris) and CodeIO, 8 GPUs, bf16, remat.

    python launch/train.py --config configs/fst_qwen3.py --config.model.path=~/models/Qwen3-8B \\
        --config.tasks.math.train_files=~/data/polaris/train.jsonl             # Math (the default task)
    python launch/train.py --config configs/fst_qwen3.py --config.task=codeio \\
        --config.tasks.codeio.train_files=~/data/codeio/train.jsonl \\
        --config.tasks.codeio.val_files=~/data/codeio/val.jsonl                 # CodeIO
    python launch/train.py --config configs/fst_qwen3.py --config.method=rl         # RL-only baseline
    python launch/train.py --config configs/fst_qwen3.py \\
        --config.gepa.reflection.kind=openai --config.gepa.reflection.model=<name> \\
        --config.gepa.reflection.base_url=https://<endpoint>/v1                      # a hosted reflector

The recipe's numbers are the defaults of fst_jax/config.py `default_config()` (each commented there with its
source); this file sets only what belongs to this model, task and machine.
"""

from fst_jax.config import default_config


def get_config():
    c = default_config()
    c.model.path = "~/models/Qwen3-8B"
    c.model.preset = "8B"                  # the shapes --dry_run plans when model.path holds no config.json
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"        # fp32 master weights: AdamW steps of lr 1e-6 vanish in bf16
    # The plan (launch/train.py --dry_run, README "Planning a run"): with dots_saveable every layer keeps its
    # [T, T] attention scores for the backward pass (816 GB/device at 32 rows × 5120 tokens); recomputing
    # each layer from its input and 8-row micro-batches (one row per device) bring the update to ≈ 42 GB.
    c.model.remat = "nothing_saveable"
    # 8 GPUs: parameters FSDP-sharded for the update; the sampler replicates them over the batch axes
    # (parallel.SAMPLE_RULES) and splits the batch. On a TPU slice or 2×8 GPUs, change only these sizes.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.mesh.device_memory_gb = 80.0         # H100 80 GB

    c.tasks = {"math": dict(task="math", train_files="~/data/polaris/train.jsonl",  # Polaris: problem, answer
                            val_files="~/data/polaris/val.jsonl", val_fraction=0.0,
                            fields={"question": "problem", "answer": "answer"}, options={}),
               "codeio": dict(task="codeio", train_files="~/data/codeio/train.jsonl",
                              val_files="~/data/codeio/val.jsonl", val_fraction=0.0,
                              fields={"question": "prompt", "answer": "output"}, options={})}
    c.task = "math"                        # --config.task=codeio trains CodeIO

    # The paper's cycle and slow-weight recipe: T=6, B=32, G=8, K=4, CISPO τ=4, KL 1e-3, AdamW lr 1e-6,
    # 10 warm-up steps, GEPA 960 rollouts per cycle — all kept at default_config()'s values.
    c.rl.micro_batch_size = 8              # 256 rollouts per step in 32 micro-batches (memory, not maths)
    c.rl.logprob_chunk_size = 512          # never build [B, T, 151936] fp32 logits
    c.sampling.max_new_tokens = 4096
    c.sampling.max_prompt_tokens = 1024    # CodeIO prompts (system + program + input); longer ones are errors
    # The sampler's slots: 24 rows in flight per GPU (18.1 GB of KV each at 1024 + 4096 columns); one RL
    # step's 256 rollouts, GEPA's and mean@k's rows stream through them. At 256 (all of a step's rollouts at
    # once) the decode's peak is 72.6 GB, over the 72 GB budget (launch/train.py --dry_run).
    c.sampling.slots = 192
    c.eval.max_new_tokens = 4096
    c.gepa.reflection.kind = "local"       # the frozen base; the paper used a hosted model ("openai")
    c.total_steps = 200
    return c
