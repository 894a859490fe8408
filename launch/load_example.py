"""Load a Qwen3 checkpoint into a device mesh and run it: the foundation end to end, no downloads.

    python launch/load_example.py                          # makes a small random Qwen3 checkpoint first
    python launch/load_example.py --checkpoint ~/qwen3-8b --mesh fsdp=-1

It writes a random-weight checkpoint in HF format (our `save_pretrained`), loads it back with
`load_pretrained` straight into the mesh's shardings, renders a chat with the tokenizer's template and prints
the next-token prediction, the parameter layout and the time each stage took.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.runtime import parallel
from fst_jax.models.char_tokenizer import make_char_tokenizer
from fst_jax.models.config import Qwen3Config
from fst_jax.models.hf import load_pretrained, load_tokenizer, render_chat, save_pretrained
from fst_jax.models.qwen3 import Qwen3


def _parse_mesh(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (part.split("=") for part in text.split(",") if part)}
    except ValueError as e:
        raise SystemExit(f"--mesh must look like 'fsdp=4,tensor=2', got {text!r}") from e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a local HF Qwen3 directory; default: make a random small one")
    ap.add_argument("--mesh", default="fsdp=-1", help="mesh sizes, e.g. 'data=2,fsdp=2,tensor=2'")
    ap.add_argument("--prompt", default="Reverse the word: banana")
    args = ap.parse_args()

    t0 = time.perf_counter()
    path = args.checkpoint
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="fst_jax_example_"), "qwen3-random")
        config = Qwen3Config(vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
        save_pretrained(Qwen3(config, rngs=nnx.Rngs(0)), path, tokenizer=make_char_tokenizer())
        print(f"wrote a random {config.num_params() / 1e6:.2f}M-parameter Qwen3 to {path} "
              f"({time.perf_counter() - t0:.1f}s)")

    mesh = parallel.make_mesh(_parse_mesh(args.mesh))
    t1 = time.perf_counter()
    model = load_pretrained(path, mesh=mesh)
    print(f"loaded {path} onto mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} "
          f"device(s) in {time.perf_counter() - t1:.1f}s")
    print(f"  q_proj {model.layers.q_proj[...].shape} sharded as {model.layers.q_proj[...].sharding.spec}")

    tokenizer = load_tokenizer(path)
    ids = render_chat(tokenizer, [{"role": "user", "content": args.prompt}], enable_thinking=False)
    graphdef, params = nnx.split(model, nnx.Param)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    t2 = time.perf_counter()
    with jax.set_mesh(mesh):
        logits = forward(params, jnp.asarray([ids]))
    logits.block_until_ready()
    top = np.argsort(np.asarray(logits[0, -1]))[::-1][:5]
    print(f"forward over {len(ids)} prompt tokens (compile + run) in {time.perf_counter() - t2:.2f}s")
    print("top-5 next tokens:", [tokenizer.decode([int(t)]) for t in top])


if __name__ == "__main__":
    main()
