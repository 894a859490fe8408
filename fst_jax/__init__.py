"""fst_jax: Fast-Slow Training for large language models in JAX/Flax.

Slow weights (the model's parameters) learn by a policy-gradient update (CISPO) through optax; fast weights
(a population of system prompts) evolve by GEPA. Both train together, in cycles, on the same reward.
"""

__version__ = "0.1.0"
