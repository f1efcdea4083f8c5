"""Outer levels (step clock) -> one optax transform.

``config.levels`` is a dict of named levels:

    levels = dict(
        embeddings=dict(params="embed", every=1, optimizer=dict(name="adamw", ...)),
        blocks=dict(params="blocks/.*", every=4, optimizer=dict(name="m3", ...)),
        norms=dict(params=".*norm.*", every="never", optimizer=dict(name="sgd", ...)),
    )

* ``params`` is a regular expression matched with ``re.fullmatch`` against
  the parameter path, the "/"-joined keys of the parameter tree, e.g.
  ``blocks/0/mixer/wq/kernel`` (a pattern must match the whole path).
  Every parameter must be matched by exactly one level.
* ``every`` is the level's period in optimizer steps (int >= 1) or
  ``"never"`` (frozen: zero updates, no optimizer state).  A level with
  period k > 1 averages its gradients over k steps and updates on steps
  k, 2k, ... (the same arithmetic as ``optax.MultiSteps``); on the other
  steps its update is zero and its optimizer is not run.  Period 1 keeps no
  accumulation buffer.  Note the mean: NL Eq. 71 writes the *sum* of the
  chunk's gradients, so a learning rate taken from that form is k times the
  one to use here.
* ``optimizer`` is a spec for ``nl_jax.optim.build_optimizer``.  Its
  learning-rate schedule counts the level's own updates, as
  ``optax.MultiSteps`` does: it spans ``total_steps // every`` updates, so
  for a level with period k, ``warmup_steps=w`` lasts w * k outer steps.
  A frozen level may carry an optimizer spec (it is checked, then unused).

Global-norm clipping (``grad_clip_norm > 0``) acts on the gradient of the
trainable levels before it is split between them: frozen parameters'
gradients are zeroed first, so they neither count in the norm nor scale the
other levels' updates (``frozen_mask`` lets a train step skip computing them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.optim import build_optimizer

FROZEN = "never"
log = logging.getLogger(__name__)


class PeriodicState(NamedTuple):
    mini_step: jax.Array       # gradients seen since the last update, in [0, every)
    acc_grads: optax.Updates   # running mean of those gradients
    inner_state: optax.OptState


def every_k_steps(inner: optax.GradientTransformation, every: int
                  ) -> optax.GradientTransformation:
    """Runs ``inner`` on the mean gradient of every ``every`` steps; zero updates between."""
    if every == 1:
        return inner

    def init(params):
        # fp32 accumulator whatever the parameter dtype: a bf16 running mean loses bits.
        acc = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return PeriodicState(jnp.zeros((), jnp.int32), acc, inner.init(params))

    def update(grads, state, params=None):
        acc = jax.tree.map(lambda g, a: a + (g.astype(jnp.float32) - a) / (state.mini_step + 1),
                           grads, state.acc_grads)
        emit = state.mini_step == every - 1

        def apply_inner(operand):
            acc, inner_state = operand
            updates, inner_state = inner.update(acc, inner_state, params)
            updates = jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads)
            return updates, jax.tree.map(jnp.zeros_like, acc), inner_state

        def hold(operand):
            acc, inner_state = operand
            return jax.tree.map(jnp.zeros_like, grads), acc, inner_state  # grads' dtypes

        updates, acc, inner_state = jax.lax.cond(emit, apply_inner, hold,
                                                 (acc, state.inner_state))
        mini_step = jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32)
        return updates, PeriodicState(mini_step, acc, inner_state)

    return optax.GradientTransformation(init, update)


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_paths(params) -> list[str]:
    """The "/"-joined key path of every parameter (nested dicts or nnx.State)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
    return ["/".join(_key_name(k) for k in path) for path, _ in flat]


def _map_paths(fn, params):
    """A tree shaped like ``params`` (down to variables) with ``fn(path)`` at each leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: fn("/".join(_key_name(k) for k in path)), params,
        is_leaf=_is_variable)


def _as_dict(x) -> dict:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def _parse_every(name: str, every) -> int | str:
    if every == FROZEN:
        return FROZEN
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"levels.{name}.every={every!r} must be an integer >= 1 or "
                          f"{FROZEN!r}")
    return every


def assign_levels(levels_cfg: Mapping[str, Any], params) -> dict[str, str]:
    """``{parameter path: level name}``; every parameter in exactly one level."""
    if not levels_cfg:
        raise ConfigError("levels is empty: define at least one level, e.g. "
                          "levels.default=dict(params='.*', every=1, optimizer=...)")
    patterns = {}
    for name, level in levels_cfg.items():
        level = _as_dict(level)
        unknown = sorted(set(level) - {"params", "every", "optimizer"})
        if unknown:
            raise ConfigError(f"levels.{name}: unknown key(s) {unknown}; allowed: "
                              f"['params', 'every', 'optimizer']")
        if "params" not in level:
            raise ConfigError(f"levels.{name}.params is missing (a regex over parameter "
                              f"paths such as 'blocks/0/mixer/wq/kernel')")
        try:
            patterns[name] = re.compile(level["params"])
        except (re.error, TypeError) as e:
            raise ConfigError(f"levels.{name}.params={level['params']!r} is not a valid "
                              f"regular expression: {e}") from None
    owner: dict[str, str] = {}
    for path in param_paths(params):
        matched = [n for n, p in patterns.items() if p.fullmatch(path)]
        if not matched:
            raise ConfigError(f"parameter {path!r} is matched by no level; the patterns "
                              f"(re.fullmatch) are {({n: p.pattern for n, p in patterns.items()})}")
        if len(matched) > 1:
            raise ConfigError(f"parameter {path!r} is matched by several levels {matched}; "
                              f"each parameter must belong to exactly one level")
        owner[path] = matched[0]
    empty = [n for n in patterns if n not in owner.values()]
    if empty:
        raise ConfigError(f"levels {empty} match no parameter (patterns "
                          f"{[patterns[n].pattern for n in empty]}); parameter paths "
                          f"look like {sorted(owner)[:4]}")
    return owner


def build_levels(levels_cfg, params, *, total_steps: int, grad_clip_norm: float = 0.0
                 ) -> optax.GradientTransformation:
    """One optax transform for all outer levels (see the module docstring).

    ``params`` may hold arrays or ShapeDtypeStructs (only paths are read).
    """
    owner = assign_levels(levels_cfg, params)
    transforms, frozen = {}, set()
    for name, level in levels_cfg.items():
        level = _as_dict(level)
        every = _parse_every(name, level.get("every", 1))
        if every == FROZEN:
            frozen.add(name)
            if "optimizer" in level:  # checked so a typo fails now, not when unfrozen
                build_optimizer(level["optimizer"], 1, where=f"levels.{name}.optimizer")
            transforms[name] = optax.set_to_zero()
            continue
        if "optimizer" not in level:
            raise ConfigError(f"levels.{name}.optimizer is missing")
        if every > total_steps:
            log.warning("levels.%s.every=%d exceeds the %d training steps: the level never "
                        "updates (use every='never' to freeze it on purpose)",
                        name, every, total_steps)
        inner = build_optimizer(level["optimizer"], max(total_steps // every, 1),
                                where=f"levels.{name}.optimizer")
        transforms[name] = every_k_steps(inner, every)
    labels = lambda tree: _map_paths(owner.__getitem__, tree)  # noqa: E731
    is_frozen = lambda tree: _map_paths(lambda p: owner[p] in frozen, tree)  # noqa: E731
    # Always chained (stateless), so grad_clip_norm can change on resume.
    return optax.chain(clip_trainable(float(grad_clip_norm or 0.0), is_frozen),
                       optax.partition(transforms, labels))


def clip_trainable(max_norm: float, is_frozen) -> optax.GradientTransformation:
    """Zeroes frozen parameters' gradients, then clips the rest to global norm
    ``max_norm`` (0: no clipping).  Stateless (``EmptyState``) whatever the
    arguments, so the optimizer state's structure does not depend on them."""

    def update(grads, state, params=None):
        del params
        mask = is_frozen(grads)
        grads = jax.tree.map(lambda f, g: jax.tree.map(jnp.zeros_like, g) if f else g,
                             mask, grads)
        if max_norm > 0:
            grads, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        return grads, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _is_frozen(levels_cfg, name: str) -> bool:
    return _as_dict(levels_cfg[name]).get("every", 1) == FROZEN


def frozen_mask(levels_cfg, params):
    """A tree like ``params`` with True at the parameters of frozen levels.

    A train step can ``stop_gradient`` these so their weight gradients are not
    computed at all (they would be zeroed by ``build_levels`` anyway).
    """
    owner = assign_levels(levels_cfg, params)
    return _map_paths(lambda p: _is_frozen(levels_cfg, owner[p]), params)


def _find(state, kind):
    """First sub-state that is an instance of ``kind`` (depth-first over tuples)."""
    if isinstance(state, kind):
        return state
    if isinstance(state, tuple):
        for s in state:
            found = _find(s, kind)
            if found is not None:
                return found
    return None


def _find_hyperparams(state):
    if hasattr(state, "hyperparams") and hasattr(state, "count"):
        return state
    if isinstance(state, tuple):
        for s in state:
            found = _find_hyperparams(s)
            if found is not None:
                return found
    return None


def level_metrics(opt_state) -> dict[str, jax.Array]:
    """``lr/<level>`` (the learning rate of the level's latest update) and
    ``updates/<level>`` (how many updates it has made) for every level."""
    partition = _find(opt_state, optax.PartitionState)
    if partition is None:
        raise ValueError("level_metrics: the optimizer state was not built by build_levels")
    out = {}
    for name, masked in partition.inner_states.items():
        inject = _find_hyperparams(masked.inner_state)
        if inject is None:  # frozen level
            out[f"lr/{name}"] = jnp.zeros((), jnp.float32)
            out[f"updates/{name}"] = jnp.zeros((), jnp.int32)
        else:
            out[f"lr/{name}"] = jnp.asarray(inject.hyperparams["learning_rate"], jnp.float32)
            out[f"updates/{name}"] = jnp.asarray(inject.count, jnp.int32)
    return out
