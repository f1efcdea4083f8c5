"""Continuum Memory System, CMS (NL section 7.1, Eq. 70-74): Hope's channel mixer.

A CMS is a set of MLP levels, each with its own update period in TOKENS
(``cfg.cms.periods``, e.g. ``(16, 64, "never")``):

* ``"never"``: frozen in context (a plain MLP, trained only by the outer
  optimizer).  One level of period ``"never"`` is bit-for-bit the Transformer++
  SwiGLU channel mixer.
* an integer ``C``: updated in context every ``C`` tokens (Eq. 71).  All tokens
  of a chunk are processed in parallel with the chunk-start weights
  ``theta_i``; at the end of the chunk

      theta_{i+1} = theta_i - s_i * sum_{t in chunk} eta_t * grad l(theta_i; x_t),

  with ``s_i = min(1, max_update |theta_i| / |sum ...|)`` per weight matrix and
  sequence (``cfg.cms.max_update``, default 0.005, 0 disables; see
  ``bounded_update``): a trust ratio that keeps the chunk step from
  overshooting when a few inputs make the SwiGLU curvature large.

  Causal choice: the outputs of chunk ``i`` use ``theta_i`` (the weights at the
  START of the chunk); the update made from chunk ``i`` applies from chunk
  ``i + 1`` on, so no token's output depends on itself or on later tokens.
  The state (weights, the gradient accumulated over an unfinished chunk and
  the token position) is carried across calls, so a document processed segment
  by segment gives the same result as one pass, for any segment lengths.
  A period longer than the sequence never fires inside one training sequence:
  in the forward pass such a level acts as frozen and is a STEP-clock level.
  Its period on the step clock is the user's to set: pair it with a
  ``config.levels`` entry whose ``params`` regex selects
  ``.../mlp/levels/<i>/...`` and whose ``every`` is the period in steps.

In-context objective (the "open point" of NL_MATH section 4), chosen here: the
L2 associative objective with self-generated values

    l(theta; x_t) = || MLP_theta(x_t) - vhat_t ||^2,
    vhat_t = x_t                       (cfg.cms.target = "input", default)
    vhat_t = x_t W_target              (cfg.cms.target = "projection"; W_target
                                        an outer-level parameter, identity init)

``x_t`` is the level's own input.  Because a level computes a residual
increment (``h_l = h_{l-1} + MLP_l(h_{l-1})``), the "input" target asks the
level to reproduce its input, i.e. to double the residual stream direction it
has seen, a reconstruction / residual-identity memory.  The per-token learning
rate is ``eta_t = cfg.cms.lr * sigmoid(w . x_t + b)`` (``w, b`` outer-level
parameters, ``w = 0, b = 0`` at init); ``cms.lr = 0`` makes every update zero,
and the level computes exactly its frozen MLP.

Variants (``cfg.cms.variant``):

* ``"sequential"`` (Eq. 73, default): the chain ``y = MLP^(k)(...MLP^(1)(x))``
  of residual blocks; every level's initial state is an outer-level parameter.
  The module returns the sum of the level increments,
  ``y = sum_l MLP_l(h_{l-1})`` (accumulated in that order so that one level
  returns ``MLP_1(x)`` bit-for-bit); the LM block adds ``x``.
* ``"independent"`` (Eq. 74): ``y = sum_l softmax(a)_l MLP^(l)(x)``, every level
  reads ``x``; the aggregation logits ``a`` are outer-level parameters.
* ``"nested"`` (Eq. 72): the same chain, slowest level first; the initial
  state of level s+1 is learned by level s.  Eq. 72 defines it as
  argmin_Phi of level s+1's loss over contexts of C^(s) tokens; here it is
  solved first-order (Reptile) on level s's clock: level s+1 carries Phi (its
  initial state, started at its outer-level weights) and, at every C^(s)-token
  boundary, after its own update,

      Phi <- (1 - eps) Phi + eps theta^(s+1),   theta^(s+1) <- Phi,

  i.e. it is re-initialised every C^(s) / C^(s+1) of its own updates from an
  initial state that moves towards what it learned in that block
  (``cfg.cms.nested_lr`` = eps, default 0.1; eps = 1 never resets, so it is
  the sequential variant; eps = 0 resets to the outer-level weights).  Every
  in-context period must be a multiple of the next level's; a level after a
  ``"never"`` level has no slower in-context parent and is not reset.

Config keys, ``cfg.cms`` (all optional): ``periods`` (tuple of positive ints or
``"never"``), ``variant``, ``block`` (``"swiglu"`` or ``"mlp"``: W_down
gelu(W_up x)), ``d_ff`` (int or one per level; default ``model.d_ff``), ``lr``,
``target``, ``max_update``, ``nested_lr``, ``use_cms`` (False: the ablation
"Hope without CMS", a single frozen MLP level whatever ``periods`` says).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory.scan import grouped_scan
from nl_jax.models.layers import Dense, param
from nl_jax.sharding import constrain

NEVER = "never"
VARIANTS = ("sequential", "independent", "nested")
BLOCKS = ("swiglu", "mlp")
TARGETS = ("input", "projection")


# --------------------------------------------------------------------------
# Chunk layout shared by every streaming in-context level.
# --------------------------------------------------------------------------

def to_chunks(x: jax.Array, offset: jax.Array | int, chunk: int, streaming: bool):
    """Lays ``x [B, T, ...]`` out as chunks aligned to the token clock.

    ``offset`` is the number of tokens of the current (unfinished) chunk that
    earlier segments already processed; the segment starts at that position of
    a zero buffer.  Returns ``(xs [n, B, C, ...], valid [n, C] bool,
    complete [n] bool)``: ``valid`` marks this segment's tokens, ``complete``
    the chunks whose last token lies in this segment (their update fires).
    ``streaming=False`` means ``offset`` is statically 0.
    """
    b, t = x.shape[:2]
    lead = chunk - 1 if streaming else 0
    n = max(1, math.ceil((t + lead) / chunk))
    length = n * chunk
    buf = jnp.zeros((b, length) + x.shape[2:], x.dtype)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, x, offset, axis=1)
    pos = jnp.arange(length)
    valid = (pos >= offset) & (pos < offset + t)
    complete = (jnp.arange(n) + 1) * chunk <= offset + t
    xs = jnp.moveaxis(buf.reshape((b, n, chunk) + x.shape[2:]), 1, 0)
    return xs, valid.reshape(n, chunk), complete


def from_chunks(ys: jax.Array, offset: jax.Array | int, t: int) -> jax.Array:
    """Inverse of ``to_chunks``: ``[n, B, C, ...] -> [B, T, ...]``."""
    n, b, c = ys.shape[:3]
    buf = jnp.moveaxis(ys, 0, 1).reshape((b, n * c) + ys.shape[3:])
    return jax.lax.dynamic_slice_in_dim(buf, offset, t, axis=1)


def remat_scan(step, carry, xs):
    """``lax.scan(step, carry, xs)`` whose backward keeps O(sqrt(n)) carries.

    The per-sequence weights are the carry (B x |theta|, the largest tensor of
    the level), so a plain scan keeps n of them for the backward pass.  The
    chunks run as ``grouped_scan`` over ~sqrt(n) groups of checkpointed steps:
    the backward keeps the group-boundary carries, recomputes one group and
    keeps its step carries, ~2 sqrt(n) in all.  Steps beyond a multiple of the
    group run as a last, shorter scan.
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


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------

def _period(value, key: str):
    if value == NEVER:
        return NEVER
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ConfigError(f"{key} must be a positive integer (tokens) or 'never', "
                      f"got {value!r}")


class CMSLevel(nnx.Module):
    """One CMS level: an MLP block, frozen or updated every ``period`` tokens.

    Parameter names match ``layers.SwiGLU`` (``gate``, ``up``, ``down``) so a
    trained MLP converts into a level by copying (NL section 7.3).
    """

    def __init__(self, d_model: int, d_ff: int, *, period, block: str = "swiglu",
                 lr: float = 0.0, target: str = "input", max_update: float = 0.005,
                 reset_every: int | None = None, reset_lr: float = 0.1,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.period, self.block, self.lr, self.target = period, block, float(lr), target
        self.max_update = float(max_update)
        # nested CMS (Eq. 72): the parent's period in tokens, or None
        self.reset_every = reset_every if period != NEVER else None
        self.reset_lr = float(reset_lr)
        self.dtype = dtype
        if block == "swiglu":
            self.gate = Dense(d_model, d_ff, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = Dense(d_model, d_ff, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = Dense(d_ff, d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        if self.in_context:
            self.lr_proj = param(rngs, jnp.zeros(()), (d_model,), ("embed",))
            self.lr_bias = param(rngs, jnp.zeros(()), (), ())
            if target == "projection":
                self.target_proj = Dense(
                    d_model, d_model, ("embed", None), rngs=rngs,
                    init=lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype))

    @property
    def in_context(self) -> bool:
        return self.period != NEVER

    def weights(self) -> dict[str, jax.Array]:
        names = ("gate", "up", "down") if self.block == "swiglu" else ("up", "down")
        return {n: getattr(self, n).kernel[...] for n in names}

    def frozen(self, x: jax.Array) -> jax.Array:
        """The MLP with its outer-level weights (exactly ``layers.SwiGLU``)."""
        if self.block == "swiglu":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = jax.nn.gelu(self.up(x))
        h = constrain(h, ("batch", "length", "mlp"))
        return self.down(h)

    def learning_rate(self, x: jax.Array) -> jax.Array:
        """eta_t = lr * sigmoid(w . x_t + b), ``[B, C]`` (fp32)."""
        logit = jnp.dot(x.astype(jnp.float32), self.lr_proj[...]) + self.lr_bias[...]
        return self.lr * jax.nn.sigmoid(logit)

    def value_target(self, x: jax.Array) -> jax.Array:
        """The self-generated value vhat_t (see the module docstring)."""
        if self.target == "projection":
            return self.target_proj(x.astype(jnp.float32))
        return x

    def init_state(self, batch: int):
        theta = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape),
                             self.weights())
        state = dict(theta=theta, acc=jax.tree.map(jnp.zeros_like, theta),
                     pos=jnp.zeros((), jnp.int32))
        if self.reset_every:
            state["init"] = theta   # Phi, the learned initial state (nested)
        return state

    def _reset(self, theta, init, fire):
        """Nested CMS (Eq. 72) at a parent boundary (``fire``): Phi moves towards
        the weights learned in the block, and the level restarts from it."""
        eps = self.reset_lr
        init = jax.tree.map(lambda p, w: jnp.where(fire, (1.0 - eps) * p + eps * w, p),
                            init, theta)
        theta = jax.tree.map(lambda p, w: jnp.where(fire, p, w), init, theta)
        return theta, init

    def __call__(self, x: jax.Array, state: Any = None):
        if not self.in_context:
            return self.frozen(x), None
        if state is None:
            return self._one_pass(x)
        return self._streaming(x, state)

    def _chunk_step(self, theta, x_c, valid_c=None):
        """(outputs at theta, the chunk's summed gradient): Eq. 71 for one chunk."""
        eta = self.learning_rate(x_c)
        if valid_c is not None:
            eta = eta * valid_c[None, :]
        return chunk_gradient(self.block, theta, x_c, self.value_target(x_c), eta,
                              self.dtype)

    def _one_pass(self, x: jax.Array):
        """A whole sequence from the outer weights (training): the scan carries only
        theta; a trailing partial chunk is handled after it (its sum is the
        returned ``acc``)."""
        b, t = x.shape[:2]
        period = self.period
        n_full, rem = divmod(t, period)
        state = self.init_state(b)
        if t == 0:
            return jnp.zeros(x.shape, self.dtype), state
        theta = state["theta"]
        ys = []
        if n_full:
            def step(carry, inputs):
                theta, init = carry
                x_c, fire = inputs
                y_c, grad = self._chunk_step(theta, x_c)
                theta = bounded_update(theta, grad, self.max_update)
                if init is not None:
                    theta, init = self._reset(theta, init, fire)
                return (theta, init), y_c

            xs = jnp.moveaxis(x[:, :n_full * period].reshape(
                (b, n_full, period) + x.shape[2:]), 1, 0)
            ends = (jnp.arange(n_full) + 1) * period
            fire = (ends % self.reset_every == 0 if self.reset_every
                    else jnp.zeros(ends.shape, bool))
            (theta, init), y_full = remat_scan(step, (theta, state.get("init")), (xs, fire))
            if init is not None:
                state["init"] = init
            ys.append(jnp.moveaxis(y_full, 0, 1).reshape((b, n_full * period, -1)))
        if rem:
            y_last, acc = self._chunk_step(theta, x[:, n_full * period:])
            ys.append(y_last)
        else:
            acc = jax.tree.map(jnp.zeros_like, theta)
        y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)
        state.update(theta=theta, acc=acc, pos=jnp.asarray(t, jnp.int32))
        return y, state

    def _streaming(self, x: jax.Array, state):
        """A segment that continues ``state`` (its chunk may have started earlier)."""
        if self.reset_every and "init" not in state:
            raise ConfigError("model.cms.variant='nested': this CMS state has no 'init' "
                              "(the learned initial state); it comes from a non-nested "
                              "CMS. Start the stream without a state or use the "
                              "variant the state was made with")
        period = self.period
        offset = state["pos"] % period
        xs, valid, complete = to_chunks(x, offset, period, streaming=True)

        # global position of each chunk's end: a nested reset fires there
        ends = state["pos"] - offset + (jnp.arange(complete.shape[0]) + 1) * period
        fire = (complete & (ends % self.reset_every == 0) if self.reset_every
                else jnp.zeros(ends.shape, bool))

        def step(carry, inputs):
            theta, acc, init = carry
            x_c, valid_c, complete_c, fire_c = inputs
            y_c, grad = self._chunk_step(theta, x_c, valid_c)
            acc = jax.tree.map(jnp.add, acc, grad)
            new_theta = jax.tree.map(lambda w, w_next: jnp.where(complete_c, w_next, w),
                                     theta, bounded_update(theta, acc, self.max_update))
            acc = jax.tree.map(lambda a: jnp.where(complete_c, jnp.zeros_like(a), a), acc)
            if init is not None:
                new_theta, init = self._reset(new_theta, init, fire_c)
            return (new_theta, acc, init), y_c

        (theta, acc, init), ys = remat_scan(
            step, (state["theta"], state["acc"], state.get("init")),
            (xs, valid, complete, fire))
        y = from_chunks(ys, offset, x.shape[1])
        new_state = dict(theta=theta, acc=acc, pos=state["pos"] + x.shape[1])
        if init is not None:
            new_state["init"] = init
        return y, new_state


class ContinuumMemory(nnx.Module):
    """CMS channel mixer: ``y, state = cms(x, state)`` (Eq. 70-74)."""

    streams_exactly = True   # at any cut

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = dict(cfg.get("cms", None) or {})
        known = {"periods", "variant", "block", "d_ff", "lr", "target", "use_cms",
                 "max_update", "nested_lr"}
        unknown = sorted(set(c) - known)
        if unknown:
            raise ConfigError(f"model.cms has unknown keys {unknown}; allowed: "
                              f"{sorted(known)}")
        periods = c.get("periods", (NEVER,))
        if isinstance(periods, (str, int)):
            periods = (periods,)
        periods = tuple(_period(p, f"model.cms.periods[{i}]")
                        for i, p in enumerate(periods))
        if not periods:
            raise ConfigError("model.cms.periods must name at least one level")
        if not c.get("use_cms", True):
            periods = (NEVER,)
        self.variant = c.get("variant", "sequential")
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.cms.variant={self.variant!r}; choose one of "
                              f"{list(VARIANTS)}")
        resets = self._nested_resets(periods) if self.variant == "nested" else (
            (None,) * len(periods))
        nested_lr = c.get("nested_lr", 0.1)
        if (not isinstance(nested_lr, (int, float)) or isinstance(nested_lr, bool)
                or not 0 <= nested_lr <= 1):
            raise ConfigError(f"model.cms.nested_lr must be a number in [0, 1], got "
                              f"{nested_lr!r}")
        block = c.get("block", "swiglu")
        if block not in BLOCKS:
            raise ConfigError(f"model.cms.block={block!r}; choose one of {list(BLOCKS)}")
        target = c.get("target", "input")
        if target not in TARGETS:
            raise ConfigError(f"model.cms.target={target!r}; choose one of "
                              f"{list(TARGETS)}")
        lr = c.get("lr", 1e-2)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
            raise ConfigError(f"model.cms.lr must be a number >= 0, got {lr!r}")
        max_update = c.get("max_update", 0.005)
        if (not isinstance(max_update, (int, float)) or isinstance(max_update, bool)
                or max_update < 0):
            raise ConfigError(f"model.cms.max_update must be a number >= 0 (0 disables "
                              f"the bound), got {max_update!r}")
        d_ff = c.get("d_ff", cfg.d_ff)
        d_ffs = tuple(d_ff) if isinstance(d_ff, (tuple, list)) else (d_ff,) * len(periods)
        if len(d_ffs) != len(periods) or not all(
                isinstance(f, int) and f > 0 for f in d_ffs):
            raise ConfigError(f"model.cms.d_ff must be a positive int or one per level "
                              f"({len(periods)}), got {d_ff!r}")
        dtype = jnp.dtype(cfg.dtype)
        self.levels = nnx.List([
            CMSLevel(cfg.d_model, f, period=p, block=block, lr=lr, target=target,
                     max_update=max_update, reset_every=r, reset_lr=nested_lr,
                     rngs=rngs, dtype=dtype)
            for p, f, r in zip(periods, d_ffs, resets, strict=True)])
        if self.variant == "independent":
            self.mix_logits = param(rngs, jnp.zeros(()), (len(periods),), (None,))

    @property
    def in_context_periods(self) -> tuple[int, ...]:
        """Periods (tokens) of the levels updated in context."""
        return tuple(level.period for level in self.levels if level.in_context)

    @staticmethod
    def _nested_resets(periods) -> tuple:
        """Per level, the period of its in-context parent (the level before it)."""
        resets = [None]
        for i in range(1, len(periods)):
            parent, child = periods[i - 1], periods[i]
            if parent == NEVER or child == NEVER:
                resets.append(None)
                continue
            if parent <= child or parent % child:
                raise ConfigError(
                    f"model.cms.periods={tuple(periods)}: the nested variant lists levels "
                    f"slowest first and each in-context period must be a multiple of the "
                    f"next one (level {i - 1}: {parent} tokens, level {i}: {child}); "
                    f"e.g. periods=(128, 32, 8), or use variant='sequential'")
            resets.append(parent)
        return tuple(resets)

    def __call__(self, x: jax.Array, state: Any = None):
        states = state if state is not None else (None,) * len(self.levels)
        new_states = []
        if self.variant == "independent":
            weights = jax.nn.softmax(self.mix_logits[...])
            y = None
            for i, (level, s) in enumerate(zip(self.levels, states, strict=True)):
                out, s = level(x, s)
                term = weights[i].astype(out.dtype) * out
                y = term if y is None else y + term
                new_states.append(s)
            return y, tuple(new_states)
        h, y = x, None
        for level, s in zip(self.levels, states, strict=True):
            delta, s = level(h, s)
            y = delta if y is None else y + delta
            h = h + delta.astype(h.dtype)
            new_states.append(s)
        return y, tuple(new_states)
