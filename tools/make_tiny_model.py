"""Make the embedded default's base model: a tiny char-level Qwen3 trained from scratch on synthetic data.

    python tools/make_tiny_model.py --seed 0 --minutes 55 --out assets/tiny-qwen3      # train (55 min, 2 cores)
    python tools/make_tiny_model.py ... --resume                                       # continue a killed run
    python tools/make_tiny_model.py --eval-only --out assets/tiny-qwen3 --eval-json assets/tiny-qwen3/eval.json

Three skills, every example rendered with the chat template exactly as the system shows it at run time
(enable_thinking=False, mostly):
  rule following  [system = rule text, user = input]                 → the transformed input
                  [system = a generic instruction, user = input]     → the input under some training rule
  general skills  [system = generic or none, user = "count: abcde"]  → "5"
  reflection      [user = Proposer(TINY_REFLECTION_TEMPLATE).render(instruction, 2–4 failure records)]
                                                                     → "```\n<the rule>\n```"
Loss on the assistant's tokens only. Rules come from `synthetic.TRAIN_RULES`; held-out rules never appear.
Phase A (the first `--phase-a` of the time) has no reflection data: rule following must be learned first, and
on short examples it is ~6x cheaper per example. Every step's data comes from (seed, step), so a resumed run
sees the data an uninterrupted one would. With `--minutes`, the phase-B step is fixed when its time comes and
the step count when 80% of the time has passed (then a linear cool-down to the end); all three go to
make_tiny_model.json, so e.g. `--steps 4982 --phase-b-step 2712 --cooldown-start 4157` reproduces the
shipped model's schedule without a clock.

Over 400 lines: a standalone, resumable trainer with its own evaluation, used only to rebuild assets/tiny-qwen3.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import queue
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fst_jax.gepa.proposer import Proposer, extract_fenced  # noqa: E402
from fst_jax.models.char_tokenizer import make_char_tokenizer  # noqa: E402
from fst_jax.models.config import Qwen3Config  # noqa: E402
from fst_jax.models.hf import load_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from fst_jax.models.qwen3 import Qwen3  # noqa: E402
from fst_jax.tasks import synthetic as syn  # noqa: E402

SHORT_T, LONG_T = 80, 416          # token buckets: rule/skill examples, reflection examples
# Rows per step in each bucket. Phase A (the first `--phase-a` of the time) teaches rule following and the
# general skills on short examples only; phase B adds reflection, which is slow to learn and needs rules known.
PHASE_A = {"short": 48, "long": 0}
PHASE_B = {"short": 24, "long": 8}


def model_config(vocab_size: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=32, rope_theta=10_000.0, tie_word_embeddings=True,
                       max_position_embeddings=1024)


# ---- data ---------------------------------------------------------------------------------------------------

class Renderer:
    """Chat rendering and char-level encoding with the shipped tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.proposer = Proposer(template=syn.TINY_REFLECTION_TEMPLATE)

    def prompt_ids(self, messages, enable_thinking=False) -> list[int]:
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def example(self, messages, answer: str, enable_thinking=False):
        prompt = self.prompt_ids(messages, enable_thinking)
        target = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        return prompt, target

    def rule_messages(self, system: str | None, user: str):
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def reflection_prompt(self, instruction: str, records) -> str:
        return self.proposer.render(instruction, records)


def _corrupt(rng: random.Random, s: str) -> str:
    if not s:
        return s
    chars = list(s)
    for _ in range(rng.randint(1, 2)):
        chars[rng.randrange(len(chars))] = rng.choice(syn.LETTERS)
    if rng.random() < 0.3:
        chars = chars[:-1] if rng.random() < 0.5 else chars + [rng.choice(syn.LETTERS)]
    return "".join(chars)


def generic_output(rng: random.Random, s: str) -> str:
    """What the model does with no rule stated: some training rule (a fifth of the time: copy)."""
    return s if rng.random() < 0.2 else syn.apply_rule(rng.choice(syn.TRAIN_RULES), s)


def reflection_case(rng: random.Random, rule: str) -> tuple[str, list[dict[str, str]]]:
    """(current instruction, failure records) for a target `rule`, as GEPA would show them."""
    task = syn.SyntheticRuleTask(rule=rule)
    while True:
        generic = rng.random() < 0.55
        if generic:
            instruction = rng.choice(syn.GENERIC_INSTRUCTIONS)
        else:
            instruction = rng.choice(syn.TRAIN_RULES)
            if syn.rule_function_key(instruction) == syn.rule_function_key(rule):
                continue
        k = 3 if rng.random() < 0.85 else rng.choice((2, 2, 4))
        records = []
        for _ in range(k):
            s = syn.random_input(rng)
            out = generic_output(rng, s) if generic else syn.apply_rule(instruction, s)
            if rng.random() < 0.1:
                out = _corrupt(rng, out)
            problem = {"input": s, "answer": syn.apply_rule(rule, s)}
            records.append({"Inputs": task.format_problem(problem), "Generated Outputs": out,
                            "Feedback": task.score(problem, out).feedback})
        if any(r["Feedback"] != "correct" for r in records):
            return instruction, records


def make_example(rng: random.Random, kind: str, r: Renderer):
    think = False if rng.random() < 0.85 else None
    if kind == "rule":
        rule = syn.rules_for_training(rng, 1)[0]
        s = syn.random_input(rng)
        return r.example(r.rule_messages(rule, s), syn.apply_rule(rule, s), think)
    if kind == "generic":
        s = syn.random_input(rng)
        return r.example(r.rule_messages(rng.choice(syn.GENERIC_INSTRUCTIONS), s), generic_output(rng, s), think)
    if kind == "skill":
        q, a = syn.skill_example(rng.choice(syn.SKILLS), rng)
        system = rng.choice(syn.GENERIC_INSTRUCTIONS) if rng.random() < 0.7 else None
        return r.example(r.rule_messages(system, q), a, think)
    rule = syn.rules_for_training(rng, 1)[0]
    instruction, records = reflection_case(rng, rule)
    prompt = r.reflection_prompt(instruction, records)
    return r.example([{"role": "user", "content": prompt}], f"```\n{rule}\n```", think)


SHORT_MIX = (("rule", 0.62), ("generic", 0.18), ("skill", 0.20))


def _rows(examples, T):
    ids = np.zeros((len(examples), T), np.int32)
    mask = np.zeros((len(examples), T), bool)
    loss = np.zeros((len(examples), T), np.float32)   # loss weight on the token predicted *at* position t+1
    for i, (p, t) in enumerate(examples):
        seq = (p + t)[:T]
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = True
        loss[i, len(p) - 1:len(seq) - 1] = 1.0
    return ids, mask, loss


def make_batch(seed: int, step: int, r: Renderer, phase_b: bool = True):
    """Step `step`'s batch: ((ids, mask, loss weights) of the short bucket[, and of the long bucket])."""
    rng = random.Random(f"{seed}|{step}")
    kinds, weights = zip(*SHORT_MIX)
    sizes = PHASE_B if phase_b else PHASE_A
    short, long_ = [], []
    while len(short) < sizes["short"]:
        ex = make_example(rng, rng.choices(kinds, weights)[0], r)
        if len(ex[0]) + len(ex[1]) <= SHORT_T:
            short.append(ex)
    while len(long_) < sizes["long"]:
        ex = make_example(rng, "reflection", r)
        if len(ex[0]) + len(ex[1]) <= LONG_T:
            long_.append(ex)
    return (_rows(short, SHORT_T),) + ((_rows(long_, LONG_T),) if long_ else ())


# ---- training -----------------------------------------------------------------------------------------------

def lr_at(step, *, peak, warmup, cooldown_start, total):
    warm = jnp.minimum(1.0, (step + 1) / warmup)
    frac = jnp.clip((step - cooldown_start) / jnp.maximum(total - cooldown_start, 1), 0.0, 1.0)
    return peak * warm * (1.0 - 0.9 * frac)


def train(args):
    tokenizer = make_char_tokenizer()
    r = Renderer(tokenizer)
    config = model_config(len(tokenizer))
    model = Qwen3(config, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    print(f"model: {config.num_params():,} params, vocab {config.vocab_size}", flush=True)
    os.makedirs(args.workdir, exist_ok=True)
    ckpt_path = os.path.join(args.workdir, "ckpt.pkl")

    sched = {"cooldown_start": args.cooldown_start or 10**9, "total": args.steps or 10**9,
             "phase_b": args.phase_b_step or 10**9}
    # AdamW with the learning rate applied in step_fn: the schedule's end is only known once the time
    # budget is 80% spent, so it is a traced argument rather than baked into the optimizer.
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.scale_by_adam(b1=0.9, b2=0.98),
                     optax.add_decayed_weights(0.01))
    opt_state = tx.init(params)
    step, elapsed, losses = 0, 0.0, []
    if args.resume and os.path.exists(ckpt_path):
        with open(ckpt_path, "rb") as f:
            ck = pickle.load(f)
        params = jax.tree.unflatten(jax.tree.structure(params), ck["params"])
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), ck["opt_state"])
        step, elapsed, losses, sched = ck["step"], ck["elapsed"], ck["losses"], ck["sched"]
        if args.steps:
            sched.update(total=args.steps, cooldown_start=args.cooldown_start, phase_b=args.phase_b_step)
        print(f"resumed at step {step} ({elapsed / 60:.1f} min done)", flush=True)

    def loss_fn(p, batch):
        total, count = 0.0, 0.0
        for ids, mask, w in batch:
            logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            total += jnp.sum(nll * w[:, :-1])
            count += jnp.sum(w[:, :-1])
        return total / count

    @jax.jit
    def step_fn(p, o, batch, step_, sched_vals_):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, o = tx.update(grads, o, p)
        lr = lr_at(step_, peak=args.lr, warmup=args.warmup, cooldown_start=sched_vals_[0], total=sched_vals_[1])
        p = jax.tree.map(lambda a, u: a - lr * u, p, updates)
        return p, o, loss, lr

    q: queue.Queue = queue.Queue(maxsize=6)
    stop = threading.Event()

    def produce(start):
        s = start
        while not stop.is_set():
            q.put((s, make_batch(args.seed, s, r, phase_b=s >= sched["phase_b"])))
            s += 1

    threading.Thread(target=produce, args=(step,), daemon=True).start()
    budget = args.minutes * 60.0
    t_start, last_ckpt, window = time.time() - elapsed, time.time(), []

    def save_ckpt():
        tmp = ckpt_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump({"params": [np.asarray(x) for x in jax.tree.leaves(params)],
                         "opt_state": [np.asarray(x) for x in jax.tree.leaves(opt_state)],
                         "step": step, "elapsed": time.time() - t_start, "losses": losses, "sched": sched}, f)
        os.replace(tmp, ckpt_path)
        save_pretrained(nnx.merge(graphdef, params), os.path.join(args.workdir, "latest"), tokenizer=tokenizer)

    while step < sched["total"]:
        s, parts = q.get()
        assert s == step
        batch = tuple(tuple(map(jnp.asarray, part)) for part in parts)
        params, opt_state, loss, lr = step_fn(params, opt_state, batch, step,
                                              jnp.array([sched["cooldown_start"], sched["total"]], jnp.float32))
        step += 1
        window.append(float(loss))
        now = time.time()
        if not args.steps and sched["phase_b"] >= 10**9 and now - t_start >= args.phase_a * budget:
            # a few steps ahead: the producer thread has already made the next batches (queue size 6)
            sched["phase_b"] = step + 10
            print(f"phase B (reflection) from step {sched['phase_b']}", flush=True)
        if not args.steps and sched["total"] >= 10**9 and now - t_start >= 0.8 * budget:
            rate = (step - sched["phase_b"]) / (now - t_start - args.phase_a * budget)
            sched.update(cooldown_start=step, total=int(step + rate * 0.2 * budget))
            print(f"cool-down from step {step} to {sched['total']}", flush=True)
        if step % args.log_every == 0:
            losses.append((step, float(np.mean(window))))
            print(f"step {step:6d}  loss {np.mean(window):.4f}  lr {float(lr):.2e}  "
                  f"{(now - t_start) / 60:5.1f} min  {step / (now - t_start):.2f} steps/s", flush=True)
            window = []
        if now - last_ckpt >= args.ckpt_every:
            save_ckpt()
            last_ckpt = now
    stop.set()
    save_ckpt()
    wall = time.time() - t_start
    model = nnx.merge(graphdef, params)
    save_pretrained(model, args.out, tokenizer=tokenizer)
    info = {"seed": args.seed, "steps": step, "cooldown_start": sched["cooldown_start"],
            "phase_b_step": sched["phase_b"], "lr": args.lr,
            "warmup": args.warmup, "wall_minutes": round(wall / 60, 1), "num_params": config.num_params(),
            "rows": {"phase_a": PHASE_A, "phase_b": PHASE_B}, "buckets": [SHORT_T, LONG_T],
            "final_loss": losses[-1][1] if losses else None}
    with open(os.path.join(args.out, "make_tiny_model.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"saved {args.out}: {info}", flush=True)


# ---- evaluation ---------------------------------------------------------------------------------------------

class TinyLM:
    """Greedy/sampled chat completions from a saved model through our Sampler, in fixed-size batches."""

    def __init__(self, path: str, batch: int = 64):
        from fst_jax.sampling import Sampler

        model = load_pretrained(path)
        self.tok = load_tokenizer(path)
        self.sampler = Sampler(nnx.split(model, nnx.Param))
        self.batch, self.calls = batch, 0

    def chats(self, conversations, *, temperature=0.0, max_new_tokens=16, num_samples=1) -> list[str]:
        from fst_jax.models.hf import render_chat

        prompts = [render_chat(self.tok, c, enable_thinking=False) for c in conversations]
        out: list[str] = []
        step = max(1, self.batch // num_samples)
        for i in range(0, len(prompts), step):
            chunk = prompts[i:i + step]
            padded = chunk + [chunk[-1]] * (step - len(chunk))
            self.calls += 1
            res = self.sampler.generate(padded, max_new_tokens=max_new_tokens, temperature=temperature,
                                        num_samples=num_samples, seed=self.calls,
                                        stop_token_ids=[self.tok.eos_token_id], pad_id=self.tok.pad_token_id)
            texts = [self.tok.decode(t, skip_special_tokens=True) for t in res.tokens]
            out.extend(texts[:len(chunk) * num_samples])
        return out

    def follow(self, rules, inputs, **kw) -> list[str]:
        return self.chats([[{"role": "system", "content": r}, {"role": "user", "content": s}]
                           for r, s in zip(rules, inputs)], **kw)


def eval_reflection(lm: TinyLM, rules, rng: random.Random, best_of: int) -> dict:
    """From the seed prompt and three of the model's own rollouts under it (sampled, T=1), propose a rule.
    Success: the proposal, followed greedily by the model, solves >= 2 of 3 fresh inputs. Best-of-N picks, of
    N sampled proposals, the one that solves most of the three record inputs (what GEPA's acceptance sees)."""
    proposer = Proposer(template=syn.TINY_REFLECTION_TEMPLATE)
    cases = [(rule, [syn.random_input(rng) for _ in range(3)], [syn.random_input(rng) for _ in range(3)])
             for rule in rules]
    outs = lm.follow([syn.SEED_PROMPT] * 3 * len(cases), [s for c in cases for s in c[1]], temperature=1.0)
    prompts = []
    for j, (rule, inputs, _) in enumerate(cases):
        task = syn.SyntheticRuleTask(rule=rule)
        records = []
        for s, o in zip(inputs, outs[3 * j:3 * j + 3]):
            problem = {"input": s, "answer": syn.apply_rule(rule, s)}
            records.append({"Inputs": task.format_problem(problem), "Generated Outputs": o,
                            "Feedback": task.score(problem, o).feedback})
        prompts.append([{"role": "user", "content": proposer.render(syn.SEED_PROMPT, records)}])
    greedy = [extract_fenced(t) for t in lm.chats(prompts, max_new_tokens=48)]
    sampled = [extract_fenced(t) for t in lm.chats(prompts, temperature=1.0, max_new_tokens=48,
                                                    num_samples=best_of)]
    cands = [list(dict.fromkeys(p for p in sampled[j * best_of:(j + 1) * best_of] if p)) for j in range(len(cases))]
    # every (proposal, input) pair to follow, in one batched call
    jobs = []
    for j, (rule, inputs, fresh) in enumerate(cases):
        if greedy[j]:
            jobs += [(j, greedy[j], s) for s in fresh]
        for p in cands[j]:
            jobs += [(j, p, s) for s in inputs + fresh]
    followed = lm.follow([p for _, p, _ in jobs], [s for _, _, s in jobs]) if jobs else []
    right = {}
    for (j, p, s), o in zip(jobs, followed):
        right[(j, p, s)] = o.strip() == syn.apply_rule(cases[j][0], s)

    def solved(j, p, inputs):
        return sum(right.get((j, p, s), False) for s in inputs) if p else 0

    g_ok = b_ok = any_ok = same = valid = 0
    examples = []
    for j, (rule, inputs, fresh) in enumerate(cases):
        g = greedy[j]
        g_ok += solved(j, g, fresh) >= 2
        is_rule = g is not None and syn.parse_rule(g) is not None
        valid += is_rule
        same += is_rule and syn.rule_function_key(g) == syn.rule_function_key(rule)
        if cands[j]:
            best = max(cands[j], key=lambda p: solved(j, p, inputs))
            b_ok += solved(j, best, fresh) >= 2
            any_ok += any(solved(j, p, fresh) >= 2 for p in cands[j])
        if len(examples) < 6:
            examples.append({"rule": rule, "greedy": g})
    n = len(cases)
    return {"n": n, "greedy_success": g_ok / n, "greedy_same_function": same / n, "greedy_valid_rule": valid / n,
            f"best_of_{best_of}_success": b_ok / n, f"any_of_{best_of}_success": any_ok / n, "examples": examples}


def evaluate(args) -> dict:
    """The base-model numbers: rule following with the rule given, general skills, the RL tasks under the seed
    prompt (exact match and dense reward at T=1), and reflection (see `eval_reflection`)."""
    t0 = time.time()
    lm = TinyLM(args.out)
    rng = random.Random(f"eval|{args.seed}")
    n = args.eval_size
    report: dict = {"model": args.out}

    singles = [r for r in syn.TRAIN_RULES if syn.THEN not in r]
    composed = [r for r in syn.TRAIN_RULES if syn.THEN in r]
    groups = {"in_family_single": [rng.choice(singles) for _ in range(n)],
              "in_family_composed": [rng.choice(composed) for _ in range(2 * n)]}
    groups.update({f"rl_in_family/{r}": [r] * 20 for r in syn.IN_FAMILY_RL_RULES})
    groups.update({f"held_out/{r}": [r] * 20 for r in syn.HELD_OUT_RULES})
    rules = [r for g in groups.values() for r in g]
    inputs = [syn.random_input(rng) for _ in rules]
    outs = iter(lm.follow(rules, inputs))
    follow = {}
    for name, group in groups.items():
        follow[name] = float(np.mean([next(outs).strip() == syn.apply_rule(r, s)
                                      for r, s in zip(group, inputs[:len(group)])]))
        inputs = inputs[len(group):]
    report["follow_rule_given_greedy"] = follow
    print(json.dumps({"follow": follow}, indent=1), flush=True)

    skills, convs, probs = {}, [], []
    for skill in syn.SKILLS:
        task = syn.SkillTask(skill=skill)
        for p in task.make_problems(40, seed=1):
            probs.append((task, p))
            convs.append([{"role": "system", "content": syn.SEED_PROMPT},
                          {"role": "user", "content": task.format_problem(p)}])
    for (task, p), o in zip(probs, lm.chats(convs)):
        skills.setdefault(task.skill, []).append(task.score(p, o).reward)
    report["skills_under_seed_prompt_greedy"] = {k: float(np.mean(v)) for k, v in skills.items()}
    print(json.dumps({"skills": report["skills_under_seed_prompt_greedy"]}), flush=True)

    k = 8
    tasks = [syn.SyntheticRuleTask(rule=r) for r in syn.IN_FAMILY_RL_RULES + syn.HELD_OUT_RULES]
    probs = [(t, p) for t in tasks for p in t.make_problems(16, seed=1)]
    outs = lm.follow([syn.SEED_PROMPT] * len(probs), [p["input"] for _, p in probs], temperature=1.0,
                     num_samples=k)
    seed_prompt = {}
    for i, t in enumerate(tasks):
        rewards = np.array([t.score(p, outs[(16 * i + j) * k + m]).reward
                            for j, (_, p) in enumerate(probs[16 * i:16 * (i + 1)]) for m in range(k)]).reshape(16, k)
        seed_prompt[t.rule] = {"exact": float(np.mean(rewards == 1.0)), "dense_mean": float(rewards.mean()),
                               "dense_std": float(rewards.std()),
                               "within_group_std": float(rewards.std(axis=1).mean())}
    report["rl_tasks_under_seed_prompt_T1"] = seed_prompt
    print(json.dumps({"seed_prompt": seed_prompt}, indent=1), flush=True)

    report["reflection_in_family"] = eval_reflection(lm, [rng.choice(syn.TRAIN_RULES) for _ in range(2 * n)],
                                                     rng, args.best_of)
    print(json.dumps({"reflection_in_family": report["reflection_in_family"]}, indent=1), flush=True)
    report["reflection_rl_in_family"] = eval_reflection(lm, list(syn.IN_FAMILY_RL_RULES) * 4, rng, args.best_of)
    report["reflection_held_out"] = eval_reflection(lm, list(syn.HELD_OUT_RULES) * 4, rng, args.best_of)
    report["eval_minutes"] = round((time.time() - t0) / 60, 1)
    print(json.dumps({k: report[k] for k in ("reflection_rl_in_family", "reflection_held_out", "eval_minutes")},
                     indent=1), flush=True)
    if args.eval_json:
        with open(args.eval_json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-time budget (when --steps is not given)")
    ap.add_argument("--steps", type=int, default=0, help="exact number of steps (reproduces a run)")
    ap.add_argument("--cooldown-start", type=int, default=0, help="with --steps: step the cool-down starts")
    ap.add_argument("--phase-b-step", type=int, default=0, help="with --steps: step reflection data starts")
    ap.add_argument("--phase-a", type=float, default=0.45, help="fraction of --minutes without reflection data")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--out", default="assets/tiny-qwen3")
    ap.add_argument("--workdir", default="runs/make_tiny_model", help="checkpoints (ckpt.pkl) and latest export")
    ap.add_argument("--resume", action="store_true", help="continue from --workdir's checkpoint")
    ap.add_argument("--ckpt-every", type=float, default=180.0, help="seconds between checkpoints")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-only", action="store_true", help="measure the model in --out instead of training")
    ap.add_argument("--eval-size", type=int, default=60, help="rules (or problems) per evaluation")
    ap.add_argument("--best-of", type=int, default=8, help="sampled reflections per case for best-of-N")
    ap.add_argument("--eval-json", default="", help="also write the evaluation report here")
    args = ap.parse_args(argv)
    if args.steps and not args.cooldown_start:
        args.cooldown_start = int(0.8 * args.steps)
    if args.steps and not args.phase_b_step:
        args.phase_b_step = int(args.phase_a * args.steps)
    if args.eval_only:
        evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
