"""Optimizers as optax GradientTransformations, selected by name from configs.

See ``registry`` for the spec format; the transforms themselves live in
``momentum`` (Eq. 33-34, 46-49), ``dmgd`` (Eq. 50), ``newton_schulz``
(Eq. 43-44) and ``m3`` (Algorithm 1).
"""

from nl_jax.optim.newton_schulz import newton_schulz, scale_by_newton_schulz
from nl_jax.optim.registry import (
    COMPANION,
    MATRIX_OPTIMIZERS,
    OPTIMIZERS,
    OptimizerBuilder,
    build_optimizer,
    check_spec,
    fallback_spec,
    recipe,
    resolve_spec,
)
from nl_jax.optim.schedules import SCHEDULES, build_schedule

__all__ = [
           "COMPANION",
           "MATRIX_OPTIMIZERS",
           "OPTIMIZERS",
           "SCHEDULES",
           "OptimizerBuilder",
           "build_optimizer",
           "build_schedule",
           "check_spec",
           "fallback_spec",
           "newton_schulz",
           "recipe",
           "resolve_spec",
           "scale_by_newton_schulz",
]
