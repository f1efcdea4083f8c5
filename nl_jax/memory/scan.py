"""A scan over chunks rematerialised in groups of chunks."""

from __future__ import annotations

import math

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


def remat_scan(step, carry, xs):
    """``lax.scan(step, carry, xs)`` whose backward keeps O(sqrt(n)) carries.

    For levels whose carry is the largest tensor (a CMS level's per-sequence
    weights, B x |theta|): a plain scan keeps n of them for the backward pass.
    The chunks run as ``grouped_scan`` over ~sqrt(n) groups of checkpointed
    steps: the backward keeps the group-boundary carries, recomputes one group
    and keeps its step carries, ~2 sqrt(n) in all.  Steps beyond a multiple of
    the group run as a last, shorter scan.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    group = max(1, math.isqrt(n))
    n_grouped = (n // group) * group
    step = jax.checkpoint(step)
    carry, ys = grouped_scan(step, carry, jax.tree.map(lambda a: a[:n_grouped], xs), group)
    if n_grouped < n:
        carry, tail = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[n_grouped:], xs))
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
    return carry, ys
