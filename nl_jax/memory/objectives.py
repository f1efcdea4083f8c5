"""Associative-memory objectives l(M(k), v), summed over the leading token axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def objective_loss(objective: str, pred: jax.Array, value: jax.Array) -> jax.Array:
    """Sum over all entries of the per-token objective.

    ``l2``: ||M(k) - v||^2 (Titans Eq. 12); ``dot``: -<M(k), v>;
    ``huber``: sum_i huber(M(k)_i - v_i) with delta 1 (0.5 r^2 if |r| <= 1 else
    |r| - 0.5).
    """
    if objective == "l2":
        return jnp.sum(jnp.square(pred - value))
    if objective == "dot":
        return -jnp.sum(pred * value)
    if objective == "huber":
        r = pred - value
        a = jnp.abs(r)
        return jnp.sum(jnp.where(a <= 1.0, 0.5 * r * r, a - 0.5))
    raise ValueError(f"unknown objective {objective!r}")
