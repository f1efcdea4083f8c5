"""Associative-memory objectives l(M(k), v), summed over the leading token axis.

One home for every token-clock level's inner objective.  The L2 objective's
scale is explicit: Titans writes ``||M(k) - v||^2`` (Titans Eq. 12,
``l2_scale=1``, the default), Hope's self-modifying memories
``1/2 ||M(k) - v||^2`` (NL Eq. 93, ``l2_scale=0.5``, ``HOPE_L2_SCALE``); the
scale multiplies the error and so every inner step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HOPE_L2_SCALE = 0.5   # NL Eq. 93: L(M; k, v) = 1/2 ||M(k) - v||^2


def objective_loss(objective: str, pred: jax.Array, value: jax.Array,
                   l2_scale: float = 1.0) -> jax.Array:
    """Sum over all entries of the per-token objective.

    ``l2``: l2_scale ||M(k) - v||^2 (Titans Eq. 12 with scale 1, NL Eq. 93
    with 1/2); ``dot``: -<M(k), v>; ``huber``: sum_i huber(M(k)_i - v_i) with
    delta 1 (0.5 r^2 if |r| <= 1 else |r| - 0.5).
    """
    if objective == "l2":
        return l2_scale * jnp.sum(jnp.square(pred - value))
    if objective == "dot":
        return -jnp.sum(pred * value)
    if objective == "huber":
        r = pred - value
        a = jnp.abs(r)
        return jnp.sum(jnp.where(a <= 1.0, 0.5 * r * r, a - 0.5))
    raise ValueError(f"unknown objective {objective!r}")


def objective_error(objective: str, pred: jax.Array, value: jax.Array,
                    l2_scale: float = 1.0) -> jax.Array:
    """dl/dM(k) per token, the closed form of ``grad(objective_loss)`` in ``pred``.

    ``l2``: 2 l2_scale (M(k) - v); ``dot``: -v; ``huber``: clip(M(k) - v, -1, 1).
    """
    if objective == "l2":
        return (2.0 * l2_scale) * (pred - value)
    if objective == "dot":
        return -value
    if objective == "huber":
        return jnp.clip(pred - value, -1.0, 1.0)
    raise ValueError(f"unknown objective {objective!r}")
