"""M3, Multi-scale Momentum Muon (NL section 7.2, Algorithm 1).

Per parameter, with g_t the gradient at step t (t = 1, 2, ...):

    M1 <- decay1 M1 + b1 g_t                 fast momentum, every step
    V  <- decay2 V  + b2 g_t^2               second moment, every step
    O1  = NS(M1)
    theta <- theta - lr ((O1 + alpha O2) / (sqrt(V) + eps) + weight_decay theta)
    every f steps (after the update of step t, t mod f = 0):
        M2 <- decay3 M2 + b3 (g_{t-f+1} + ... + g_t)   slow momentum, chunk sum
        O2  = NS(M2)                         used by the next f steps

Algorithm 1 writes plain sums (decay1 = decay2 = decay3 = 1, the defaults);
decay < 1 gives exponential-moving-average variants.  O2 starts at 0, so the
first chunk runs on the fast momentum only.  NS is the Newton-Schulz gradient
step of Eq. 43-44 (``newton_schulz``).

Non-matrix parameters (biases, norm scales: ndim < 2) have no orthogonal
factor; they take the same recursion with NS replaced by the identity:
(M1 + alpha M2) / (sqrt(V) + eps).  With Algorithm 1's plain sums this is
not Adam's bounded ratio: for a steady gradient g it is about
b1 t g / sqrt(b2 t g^2) ~ sqrt(t), and the matrix path's O / sqrt(V) shrinks
like 1 / sqrt(t).  Decays < 1 (as in experiments/optimizers/m3.py) keep
both bounded.  Tensors with ndim >= 3 are stacks of matrices (per head).

``weight_decay`` (decoupled, scaled by lr) needs ``params`` in ``update``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nl_jax.optim.newton_schulz import is_matrix, newton_schulz


class M3State(NamedTuple):
    count: jax.Array
    fast: optax.Updates        # M1
    second: optax.Updates      # V
    slow: optax.Updates        # M2
    slow_out: optax.Updates    # O2 = NS(M2)
    chunk: optax.Updates       # sum of the current chunk's gradients


def _is_zero(x) -> bool:
    """Whether ``x`` is known to be 0 (a traced value is not known)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return float(x) == 0.0


def m3(learning_rate, b1: float = 0.9, b2: float = 0.999, b3: float = 0.9,
       alpha: float = 1.0, eps: float = 1e-8, decay1: float = 1.0, decay2: float = 1.0,
       decay3: float = 1.0, weight_decay: float = 0.0, slow_every: int = 8,
       ns_steps: int = 5, ns_step_size: float = 0.5) -> optax.GradientTransformation:
    """Algorithm 1 as an optax transform (see the module docstring)."""

    def orth(x):
        return newton_schulz(x, ns_steps, ns_step_size) if is_matrix(x) else x

    def init(params):
        # A fresh buffer per field: shared buffers could not all be donated to a jitted step.
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)  # noqa: E731
        return M3State(jnp.zeros((), jnp.int32), zeros(), zeros(), zeros(), zeros(), zeros())

    def update(grads, state, params=None):
        count = state.count + 1
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        fast = jax.tree.map(lambda m, g: decay1 * m + b1 * g, state.fast, grads)
        second = jax.tree.map(lambda v, g: decay2 * v + b2 * g * g, state.second, grads)
        direction = jax.tree.map(
            lambda m, o2, v: (orth(m) + alpha * o2) / (jnp.sqrt(v) + eps),
            fast, state.slow_out, second)
        if params is not None:
            direction = jax.tree.map(lambda d, p: d + weight_decay * p, direction, params)
        elif not _is_zero(weight_decay):
            raise ValueError("m3: weight_decay needs the parameters; call "
                             "update(grads, state, params)")
        updates = jax.tree.map(lambda d: -learning_rate * d, direction)
        chunk = jax.tree.map(jnp.add, state.chunk, grads)

        def slow_step(operand):
            slow, _, chunk = operand
            slow = jax.tree.map(lambda m, c: decay3 * m + b3 * c, slow, chunk)
            return slow, jax.tree.map(orth, slow), jax.tree.map(jnp.zeros_like, chunk)

        slow, slow_out, chunk = jax.lax.cond(
            count % slow_every == 0, slow_step, lambda operand: operand,
            (state.slow, state.slow_out, chunk))
        return updates, M3State(count, fast, second, slow, slow_out, chunk)

    return optax.GradientTransformation(init, update)
