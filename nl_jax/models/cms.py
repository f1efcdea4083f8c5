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
  overshooting when a few inputs make the SwiGLU curvature large.  It is a
  safety bound: where it binds the step is ``max_update |theta_i|`` whatever
  ``cfg.cms.lr`` is, so ``lr`` must put the raw step below it to mean
  anything.  The raw step is a sum of ``C`` gradients and grows with the
  period and the width (at init, ratio to the cap per 1e-3 of ``lr``: ~7-16
  for Hope tiny, C = 32; ~180 / ~720 for C = 512 / 2048 at d_model 1024); the
  shipped Hope configs set ``lr`` accordingly (tiny 1e-5, paper sizes 5e-7).

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

In-context objective (the "open point" of docs/equations.md section 4), chosen here: the
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

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory import cms as cms_engine
from nl_jax.memory.cms import BLOCKS, CMSLevelSpec
from nl_jax.models.layers import Dense, param
from nl_jax.sharding import constrain

NEVER = "never"
VARIANTS = ("sequential", "independent", "nested")
TARGETS = ("input", "projection")


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

    def spec(self) -> CMSLevelSpec:
        """The engine's description of this (in-context) level."""
        return CMSLevelSpec(block=self.block, period=self.period,
                            max_update=self.max_update, reset_every=self.reset_every,
                            reset_lr=self.reset_lr, dtype=self.dtype)

    def __call__(self, x: jax.Array, state: Any = None):
        if not self.in_context:
            return self.frozen(x), None
        spec = self.spec()
        if spec.reset_every and state is not None and state.init is None:
            raise ConfigError("model.cms.variant='nested': this CMS state has no 'init' "
                              "(the learned initial state); it comes from a non-nested "
                              "CMS. Start the stream without a state or use the "
                              "variant the state was made with")
        return cms_engine.apply_level(spec, self.weights(), x, self.learning_rate,
                                      self.value_target, state)


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
