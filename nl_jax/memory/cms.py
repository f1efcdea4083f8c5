"""In-context CMS levels as token-clock levels (NL section 7.1, Eq. 70-74).

The engine behind ``models/cms.py`` (which holds the outer-level parameters,
the learning-rate and target projections and composes the levels): an MLP
level updated every ``period`` tokens on explicit per-sequence weights,

    theta_{i+1} = theta_i - s_i * sum_{t in chunk i} eta_t grad l(theta_i; x_t)   (Eq. 71)

with ``l(theta; x_t) = ||MLP_theta(x_t) - vhat_t||^2`` and ``s_i`` the trust
ratio of ``bounded_update``.  A chunk's outputs use its start weights
``theta_i`` (causal); the summed step applies from the next chunk on.  Its
per-token reference is the one-pass form: a chunk IS the level's period, so
there is no per-token recurrence to compare with.

* ``apply_level``: one pass over a sequence from the level's outer-level
  weights (training), or a segment that continues a ``CMSLevelState``
  (streaming, any cut: the gradient of an unfinished chunk is carried in
  ``acc``, ``layout.to_stream_chunks`` places the segment in its chunks).
* nested CMS (Eq. 72, ``reset_every``): at every boundary of the parent's
  period the level's learned initial state moves towards the weights learned in
  the block, and the level restarts from it (first-order, Reptile).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.memory.layout import from_stream_chunks, to_stream_chunks
from nl_jax.memory.scan import remat_scan

BLOCKS = ("swiglu", "mlp")


@dataclasses.dataclass(frozen=True)
class CMSLevelSpec:
    """An in-context CMS level.

    Attributes:
      block: ``"swiglu"`` (W_down (silu(W_gate x) * W_up x)) or ``"mlp"``
        (W_down gelu(W_up x)), the level's non-residual block.
      period: C, tokens per in-context update (Eq. 71).
      max_update: the trust-ratio bound of ``bounded_update`` (0 disables).
      reset_every: nested CMS (Eq. 72): the parent's period in tokens, or None.
      reset_lr: eps of the nested reset (``Phi <- (1 - eps) Phi + eps theta``).
      dtype: the compute dtype of the block (the state stays fp32).
    """

    block: str
    period: int
    max_update: float = 0.005
    reset_every: int | None = None
    reset_lr: float = 0.1
    dtype: Any = jnp.float32


class CMSLevelState(NamedTuple):
    """Streaming state of an in-context CMS level (a pytree).

    Attributes:
      theta: the per-sequence weights ``{name: [B, ...]}`` fp32.
      acc: the summed gradient of the unfinished chunk, same structure.
      pos: tokens seen so far (int32 scalar).
      init: nested CMS only: Phi, the learned initial state; None otherwise.
    """

    theta: Any
    acc: Any
    pos: jax.Array
    init: Any = None


# --------------------------------------------------------------------------
# Pure MLP blocks on explicit weights (batched over sequences).
# --------------------------------------------------------------------------

def block_apply(block: str, theta: dict[str, jax.Array], x: jax.Array,
                dtype) -> jax.Array:
    """The level's MLP on ``x [B, C, d]`` with per-sequence weights ``[B, ...]``."""
    x = x.astype(dtype)
    w = {k: v.astype(dtype) for k, v in theta.items()}
    if block == "swiglu":
        h = jax.nn.silu(jnp.einsum("bcd,bdf->bcf", x, w["gate"])) * jnp.einsum(
            "bcd,bdf->bcf", x, w["up"])
    else:
        h = jax.nn.gelu(jnp.einsum("bcd,bdf->bcf", x, w["up"]))
    return jnp.einsum("bcf,bfd->bcd", h, w["down"])


def chunk_gradient(block: str, theta, x, target, eta, dtype):
    """sum_t eta_t grad_theta ||MLP_theta(x_t) - target_t||^2 at ``theta`` (Eq. 71).

    One vjp of the chunk's MLP with the cotangent ``2 eta_t (y_t - target_t)``:
    the same sum of per-token gradients, as matmuls.  Also returns the chunk's
    outputs ``y = MLP_theta(x)``.
    """
    y, vjp = jax.vjp(lambda th: block_apply(block, th, x, dtype), theta)
    err = 2.0 * eta[..., None] * (y.astype(jnp.float32) - target.astype(jnp.float32))
    (grad,) = vjp(err.astype(y.dtype))
    return y, jax.tree.map(lambda g: g.astype(jnp.float32), grad)


def bounded_update(theta, acc, max_update: float):
    """``theta - s * acc`` per weight matrix and sequence, ``|s acc| <= max_update |theta|``.

    ``s = min(1, max_update |theta|_F / |acc|_F)`` (a trust ratio; norms over
    every axis but the leading batch axis).  The chunk's step is a sum of
    ``period`` gradients taken at the chunk-start weights, and the curvature of
    the SwiGLU objective grows like ``|x|^4``: without a bound one chunk with a
    few large inputs overshoots (sum_t 2 eta_t |h_t|^2 >> 2), and the cubic
    block then explodes within two chunks (observed: |W| 20 -> 4e3 -> 2e18 -> NaN
    in a 128-token sequence).  With the bound ``|theta|`` grows at most by
    ``1 + max_update`` per chunk.  ``max_update <= 0`` disables it.

    The bound is a safety net, not the step size: the step is ``acc`` (so the
    level's learning rate) wherever ``|acc| <= max_update |theta|``, and does
    not depend on the learning rate at all where the bound binds.  The shipped
    Hope configs set ``cms.lr`` so that the raw step is a fraction of the cap
    (Hope tiny: median ``step_ratio`` ~0.2-0.4 from init to 60 steps, none
    above 1 on the held-out batches); at ``cms.lr`` 1e-3 it was 6-30x the cap on
    every chunk, and outputs at lr 1e-3, 1e-2 and 1e-1 agreed to 6e-7.
    """
    if max_update <= 0:
        return jax.tree.map(jnp.subtract, theta, acc)

    def one(w, a):
        axes = tuple(range(1, w.ndim))
        w_sq = jnp.sum(w * w, axes, keepdims=True)
        a_sq = jnp.sum(a * a, axes, keepdims=True)
        # s < 1 only where |a| > max_update |w|.  Every square root and division
        # reads 1 elsewhere (the two-where pattern), so derivatives of all
        # orders stay finite at a = 0 and w = 0: the second-order gradients of
        # the teach signal (nl_jax/train/teach.py) differentiate through here.
        cut = a_sq > max_update ** 2 * w_sq
        w_norm = jnp.where(w_sq > 0, jnp.sqrt(jnp.where(cut & (w_sq > 0), w_sq, 1.0)), 0.0)
        a_norm = jnp.sqrt(jnp.where(cut, a_sq, 1.0))
        return w - jnp.where(cut, max_update * w_norm / a_norm, 1.0) * a

    return jax.tree.map(one, theta, acc)


def step_ratio(theta, acc, max_update: float):
    """``|acc| / (max_update |theta|)`` per weight matrix and sequence (``[B]`` per
    leaf): above 1 where ``bounded_update`` cuts the step (a diagnostic; the
    fraction of chunk steps above 1 is how often the bound binds)."""
    def one(w, a):
        axes = tuple(range(1, w.ndim))
        return jnp.sqrt(jnp.sum(a * a, axes)) / (max_update * jnp.sqrt(jnp.sum(w * w, axes)))

    return jax.tree.map(one, theta, acc)


# --------------------------------------------------------------------------
# The level's token clock.
# --------------------------------------------------------------------------

def initial_state(spec: CMSLevelSpec, weights: dict, batch: int) -> CMSLevelState:
    """The state at a sequence start: the outer-level ``weights`` for every row."""
    theta = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape), weights)
    return CMSLevelState(theta=theta, acc=jax.tree.map(jnp.zeros_like, theta),
                         pos=jnp.zeros((), jnp.int32),
                         init=theta if spec.reset_every else None)


def _nested_reset(spec: CMSLevelSpec, theta, init, fire):
    """Nested CMS (Eq. 72) at a parent boundary (``fire``): Phi moves towards the
    weights learned in the block, and the level restarts from it."""
    eps = spec.reset_lr
    init = jax.tree.map(lambda p, w: jnp.where(fire, (1.0 - eps) * p + eps * w, p),
                        init, theta)
    theta = jax.tree.map(lambda p, w: jnp.where(fire, p, w), init, theta)
    return theta, init


def apply_level(spec: CMSLevelSpec, weights: dict, x: jax.Array,
                learning_rate: Callable[[jax.Array], jax.Array],
                value_target: Callable[[jax.Array], jax.Array],
                state: CMSLevelState | None = None):
    """An in-context level over ``x [B, T, d]``: ``(y [B, T, d], new state)``.

    ``weights``: the outer-level block weights (used when ``state`` is None);
    ``learning_rate(x_c) -> eta [B, C]`` and ``value_target(x_c) -> vhat``: the
    level's per-token step size and self-generated values (pure functions of
    the chunk's inputs).  ``state`` None: one pass from ``weights``
    (training); else the segment continues ``state`` at any cut.
    """
    def chunk_step(theta, x_c, valid_c=None):
        eta = learning_rate(x_c)
        if valid_c is not None:
            eta = eta * valid_c[None, :]
        return chunk_gradient(spec.block, theta, x_c, value_target(x_c), eta, spec.dtype)

    if state is None:
        return _one_pass(spec, initial_state(spec, weights, x.shape[0]), x, chunk_step)
    return _streaming(spec, state, x, chunk_step)


def _one_pass(spec: CMSLevelSpec, state: CMSLevelState, x: jax.Array, chunk_step):
    """A whole sequence from the outer weights: the scan carries only theta; a
    trailing partial chunk is handled after it (its sum is the returned ``acc``)."""
    b, t = x.shape[:2]
    period = spec.period
    n_full, rem = divmod(t, period)
    if t == 0:
        return jnp.zeros(x.shape, spec.dtype), state
    theta, init = state.theta, state.init
    ys = []
    if n_full:
        def step(carry, inputs):
            theta, init = carry
            x_c, fire = inputs
            y_c, grad = chunk_step(theta, x_c)
            theta = bounded_update(theta, grad, spec.max_update)
            if init is not None:
                theta, init = _nested_reset(spec, theta, init, fire)
            return (theta, init), y_c

        xs = jnp.moveaxis(x[:, :n_full * period].reshape(
            (b, n_full, period) + x.shape[2:]), 1, 0)
        ends = (jnp.arange(n_full) + 1) * period
        fire = (ends % spec.reset_every == 0 if spec.reset_every
                else jnp.zeros(ends.shape, bool))
        (theta, init), y_full = remat_scan(step, (theta, init), (xs, fire))
        ys.append(jnp.moveaxis(y_full, 0, 1).reshape((b, n_full * period, -1)))
    if rem:
        y_last, acc = chunk_step(theta, x[:, n_full * period:])
        ys.append(y_last)
    else:
        acc = jax.tree.map(jnp.zeros_like, theta)
    y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)
    return y, CMSLevelState(theta=theta, acc=acc, pos=jnp.asarray(t, jnp.int32), init=init)


def _streaming(spec: CMSLevelSpec, state: CMSLevelState, x: jax.Array, chunk_step):
    """A segment that continues ``state`` (its chunk may have started earlier)."""
    period = spec.period
    offset = state.pos % period
    xs, valid, complete = to_stream_chunks(x, offset, period, streaming=True)

    # global position of each chunk's end: a nested reset fires there
    ends = state.pos - offset + (jnp.arange(complete.shape[0]) + 1) * period
    fire = (complete & (ends % spec.reset_every == 0) if spec.reset_every
            else jnp.zeros(ends.shape, bool))

    def step(carry, inputs):
        theta, acc, init = carry
        x_c, valid_c, complete_c, fire_c = inputs
        y_c, grad = chunk_step(theta, x_c, valid_c)
        acc = jax.tree.map(jnp.add, acc, grad)
        new_theta = jax.tree.map(lambda w, w_next: jnp.where(complete_c, w_next, w),
                                 theta, bounded_update(theta, acc, spec.max_update))
        acc = jax.tree.map(lambda a: jnp.where(complete_c, jnp.zeros_like(a), a), acc)
        if init is not None:
            new_theta, init = _nested_reset(spec, new_theta, init, fire_c)
        return (new_theta, acc, init), y_c

    (theta, acc, init), ys = remat_scan(step, (state.theta, state.acc, state.init),
                                        (xs, valid, complete, fire))
    y = from_stream_chunks(ys, offset, x.shape[1])
    return y, CMSLevelState(theta=theta, acc=acc, pos=state.pos + x.shape[1], init=init)
