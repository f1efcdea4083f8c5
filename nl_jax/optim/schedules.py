"""Learning-rate schedules built from a config dict.

``schedule=dict(name=..., ...)`` inside an optimizer spec; the peak value is
the optimizer's ``learning_rate``:

  constant         lr at every step (no other keys)
  warmup_constant  linear 0 -> lr over ``warmup_steps``, then lr
  warmup_cosine    linear 0 -> lr over ``warmup_steps``, then cosine to
                   lr * ``end_factor`` at ``total_steps``
  warmup_linear    linear 0 -> lr over ``warmup_steps``, then linear to
                   lr * ``end_factor`` at ``total_steps``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from nl_jax.errors import ConfigError

SCHEDULES: dict[str, dict[str, Any]] = {
    "constant": {},
    "warmup_constant": {"warmup_steps": 0},
    "warmup_cosine": {"warmup_steps": 0, "end_factor": 0.0},
    "warmup_linear": {"warmup_steps": 0, "end_factor": 0.0},
}


# Schedules whose shape depends on the run's length (train.steps).
SPAN_TOTAL_STEPS = frozenset({"warmup_cosine", "warmup_linear"})


def build_schedule(spec: Mapping[str, Any] | None, peak: float, total_steps: int,
                   where: str = "schedule") -> optax.Schedule:
    """``step -> learning rate`` for ``spec`` (see the module docstring)."""
    spec = dict(spec or {"name": "constant"})
    name = spec.pop("name", "constant")
    if name not in SCHEDULES:
        raise ConfigError(f"{where}.name={name!r} is not a known schedule; choose one of "
                          f"{sorted(SCHEDULES)}")
    allowed = SCHEDULES[name]
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for schedule {name!r}; "
                          f"allowed: {sorted(allowed)}")
    args = {**allowed, **spec}
    warmup = args.get("warmup_steps", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"{where}.warmup_steps={warmup!r} must be an integer >= 0")
    end_factor = args.get("end_factor", 0.0)
    if not isinstance(end_factor, (int, float)) or not 0.0 <= end_factor <= 1.0:
        raise ConfigError(f"{where}.end_factor={end_factor!r} must be a number in [0, 1]")
    peak = float(peak)
    if name == "constant":
        return optax.constant_schedule(peak)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay_steps = max(total_steps - warmup, 1)
    if name == "warmup_constant":
        after = optax.constant_schedule(peak)
    elif name == "warmup_cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_factor)
    else:
        after = optax.linear_schedule(peak, peak * end_factor, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([warm, after], [warmup])
