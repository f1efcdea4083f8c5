"""Momentum as an associative memory of gradients (NL Eq. 33-34, 46-49).

Every transform returns the final update (added to the parameters by
``optax.apply_updates``) and takes the already-evaluated learning rate; the
registry wraps them in ``optax.inject_hyperparams`` so the schedule and the
hyperparameters live in the optimizer state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class MomentumState(NamedTuple):
    momentum: optax.Updates


class PreconditionedMomentumState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates
    second_moment: optax.Updates


def _zeros_like(params):
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def momentum(learning_rate, momentum: float = 0.9) -> optax.GradientTransformation:
    """m <- a m - lr g;  update = m  (Eq. 33-34: one GD step on <m, g>, decayed by a)."""

    def init(params):
        return MomentumState(_zeros_like(params))

    def update(grads, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: momentum * m - learning_rate * g,
                         state.momentum, grads)
        return m, MomentumState(m)

    return optax.GradientTransformation(init, update)


def preconditioned_momentum(learning_rate, momentum: float = 0.9, b2: float = 0.999,
                            eps: float = 1e-8) -> optax.GradientTransformation:
    """m <- a m - lr P g;  update = m  (Eq. 46-47).

    The preconditioner is the diagonal second-moment one (RMSprop / Adam's
    association, NL App. B): v <- b2 v + (1 - b2) g^2,
    P = diag(1 / (sqrt(v / (1 - b2^t)) + eps)).
    """

    def init(params):
        return PreconditionedMomentumState(jnp.zeros((), jnp.int32), _zeros_like(params),
                                           _zeros_like(params))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        v = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.second_moment, grads)
        correction = 1.0 - b2 ** count.astype(jnp.float32)
        m = jax.tree.map(
            lambda m, v, g: momentum * m - learning_rate * g / (jnp.sqrt(v / correction) + eps),
            state.momentum, v, grads)
        return m, PreconditionedMomentumState(count, m, v)

    return optax.GradientTransformation(init, update)


def delta_rule_decay(m: jax.Array, g: jax.Array, decay) -> jax.Array:
    """m (a I - G^T G) per matrix (Eq. 49).

    A vector is one row, a scalar a 1 x 1 matrix, a tensor with ndim >= 3 a
    stack of matrices over its leading axes (e.g. per-head states).  Computed
    as a m - (m G^T) G or a m - m (G^T G), whichever Gram is smaller.
    """
    shape = m.shape
    m3 = m.reshape(-1, *shape[-2:]) if m.ndim >= 2 else m.reshape(1, 1, -1)
    g3 = g.reshape(m3.shape).astype(jnp.float32)
    rows, cols = m3.shape[-2:]
    t = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731
    projected = (m3 @ t(g3)) @ g3 if rows < cols else m3 @ (t(g3) @ g3)
    return (decay * m3 - projected).reshape(shape)


def delta_momentum(learning_rate, momentum: float = 0.9) -> optax.GradientTransformation:
    """m <- m (a I - G^T G) - lr G;  update = m  (Eq. 48-49 with P = I).

    One gradient step on the L2 inner objective 1/2 ||m G^T - P||^2 (the delta
    rule on momentum): past momentum along the current gradient's directions
    is forgotten before the new gradient is written.  Each parameter is viewed
    as a matrix whose rows are keys of the last-axis size (a stack of them for
    ndim >= 3); a vector is a single row (m (a I - g g^T) = a m - (m . g) g).
    The map a I - G^T G contracts when ||G||_2 <= 1, e.g. under global-norm
    clipping at 1.
    """

    def init(params):
        return MomentumState(_zeros_like(params))

    def update(grads, state, params=None):
        del params
        m = jax.tree.map(
            lambda m, g: delta_rule_decay(m, g, momentum) - learning_rate * g,
            state.momentum, grads)
        return m, MomentumState(m)

    return optax.GradientTransformation(init, update)
