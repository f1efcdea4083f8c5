"""A scan over chunks rematerialised in groups of chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_leading(x: jax.Array, size: int, fill: float = 0.0) -> jax.Array:
    """Pad axis 0 of ``x`` to ``size`` with ``fill``."""
    extra = size - x.shape[0]
    if extra == 0:
        return x
    pad = jnp.full((extra,) + x.shape[1:], fill, x.dtype)
    return jnp.concatenate([x, pad], axis=0)


def grouped_scan(step, carry, xs, group_size: int):
    """``lax.scan(step, carry, xs)`` with ``jax.checkpoint`` around every group.

    The backward pass keeps only the carries at group boundaries (plus the
    scan's outputs) and recomputes the group's inner steps.  The leading axis of
    ``xs`` must be a multiple of ``group_size``.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if group_size == 1:
        return jax.lax.scan(jax.checkpoint(step), carry, xs)
    groups = n // group_size
    grouped = jax.tree.map(lambda x: x.reshape((groups, group_size) + x.shape[1:]), xs)

    @jax.checkpoint
    def group_step(c, g):
        return jax.lax.scan(step, c, g)

    carry, ys = jax.lax.scan(group_step, carry, grouped)
    ys = jax.tree.map(lambda y: y.reshape((n,) + y.shape[2:]), ys)
    return carry, ys
