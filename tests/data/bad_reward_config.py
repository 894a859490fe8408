"""configs/fst_tiny.py with a task whose reward breaks after a number of scored completions (tests only).

    python launch/train.py --config tests/data/bad_reward_config.py --config.tasks.rule.options.mode=nan \\
        --config.tasks.rule.options.bad_after=8

`mode`: "nan" (a NaN reward), "range" (a reward of 1.5) or "raise" (score() raises ZeroDivisionError);
`bad_after`: how many completions score normally first.
"""

import collections
import dataclasses
import importlib.util
import os

from fst_jax.tasks.base import register_task
from fst_jax.tasks.synthetic import SyntheticRuleTask

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_fst_tiny", os.path.join(_HERE, "..", "..", "configs", "fst_tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)

_Bad = collections.namedtuple("_Bad", "reward feedback extracted")
_CALLS = collections.Counter()


@register_task("flaky_rule")
@dataclasses.dataclass(frozen=True)
class FlakyRuleTask(SyntheticRuleTask):
    mode: str = "nan"
    bad_after: int = 0

    def score(self, problem, completion):
        _CALLS[id(self)] += 1
        if _CALLS[id(self)] <= self.bad_after:
            return super().score(problem, completion)
        if self.mode == "raise":
            return 1 / 0
        return _Bad(float("nan") if self.mode == "nan" else 1.5, "broken", None)


def get_config():
    c = _tiny.get_config()
    c.tasks.rule.task = "flaky_rule"
    c.tasks.rule.options = {"rule": "reverse, then shift 2", "mode": "nan", "bad_after": 0}
    return c
