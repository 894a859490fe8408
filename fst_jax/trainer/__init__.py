"""The run: the cycle loop and what it calls.

    runner.py          `FSTRunner`: the cycle loop, read top-down (fast phase, slow phase, evaluate, save)
    fast_phase.py      one GEPA search over the look-ahead window → the next population
    run_state.py       counters, checkpointed arrays, save / restore / init_from
    run_config.py      the workdir's config.json and what a resume may change
    evals.py           mean@k, KL to the base model, forgetting
    shapes.py          the shapes of every jitted program, shared by the run and its dry run
    dry_run.py         `--dry_run`: compile every program at full size, memory per device (`plan.json`)
    cost_model.py      the plan's roofline cost per phase and GPU-hours (`hlo_cost.py` counts the HLO)
    shared_sampler.py  the run's one sampler, shared by the policy and base weights, serving planned calls
    rollout_reuse.py   GEPA's rollouts standing in for RL rollouts
"""
