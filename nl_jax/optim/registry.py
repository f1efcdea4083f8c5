"""Optimizer registry: a config spec -> an ``optax`` transform with logged hyperparameters.

A spec is a dict (or ConfigDict) such as

    dict(name="adamw", learning_rate=3e-3, b1=0.9, b2=0.95, weight_decay=0.1,
         schedule=dict(name="warmup_cosine", warmup_steps=30, end_factor=0.1))

``learning_rate`` is the schedule's peak (see ``schedules``); every other key
is a hyperparameter of the named optimizer, with the defaults listed in
``OPTIMIZERS[name].defaults``.  The transform is wrapped in
``optax.inject_hyperparams``: the current learning rate and the numeric
hyperparameters sit in the optimizer state (``state.hyperparams``) for
logging, and ``state.count`` counts the optimizer's updates.

Names shared across optimizers mean the same thing: ``b1`` first-momentum
coefficient, ``b2`` second-moment coefficient, ``momentum`` the retention a of
Eq. 33, ``weight_decay`` decoupled weight decay.

Every optimizer also has a ``recipe``: the whole spec, learning rate and
schedule included, that a level gets when the command line names the
optimizer (``--config.levels.default.optimizer.name=muon`` replaces the
level's optimizer settings by ``recipe("muon")``, except the keys set on the
same command line; ``nl_jax.config.apply_overrides``).  The recipes of AdamW,
Muon, M3, delta momentum and DMGD are the settings of
``experiments/optimizers/*.py``.

Matrix optimizers (``OptimizerBuilder.matrix``: muon, m3, newton_schulz,
delta_momentum) act on weight matrices only.  A level that runs one sends its
other parameters (embeddings, output head, norms, biases, gates, convolution
kernels, readout vectors; ``nl_jax.levels.param_kind``) to the spec's
``fallback`` optimizer: by default ``COMPANION``, AdamW with the settings of
``experiments/optimizers/common.py`` (the recipe of Muon's reference
implementation); ``fallback="none"`` keeps them on the matrix optimizer's own
vector path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nl_jax.errors import ConfigError
from nl_jax.optim import dmgd as dmgd_lib
from nl_jax.optim import m3 as m3_lib
from nl_jax.optim import momentum as momentum_lib
from nl_jax.optim.newton_schulz import scale_by_newton_schulz
from nl_jax.optim.schedules import SCHEDULES, build_schedule


@dataclasses.dataclass(frozen=True)
class OptimizerBuilder:
    """``factory(learning_rate, **hyperparameters)`` with its defaults.

    ``static`` names the hyperparameters that fix shapes or loop counts; they
    are Python values, not injected arrays.  ``below_one`` names the
    moving-average coefficients that must lie in [0, 1).
    """

    factory: Callable[..., optax.GradientTransformation]
    defaults: Mapping[str, Any]
    static: tuple[str, ...] = ()
    below_one: tuple[str, ...] = ()
    recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    matrix: bool = False

    def __call__(self, learning_rate, **hyperparameters) -> optax.GradientTransformation:
        args = {**self.defaults, **hyperparameters}
        return with_fp32_state(optax.inject_hyperparams(
            self.factory, static_args=self.static, hyperparam_dtype=jnp.float32)(
                learning_rate=learning_rate, **args))


def _to_fp32(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float32)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def with_fp32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` in fp32 whatever the parameter dtype (bf16 params included).

    The optimizer state is created from fp32 views of the parameters and the
    gradients are upcast before the update, so the state keeps one dtype
    across steps (no retrace, donation-safe, exact resume); the updates are
    cast back to the gradients' dtypes.
    """

    def init(params):
        return inner.init(_to_fp32(params))

    def update(grads, state, params=None):
        updates, state = inner.update(_to_fp32(grads), state,
                                      None if params is None else _to_fp32(params))
        updates = jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), updates, grads)
        return updates, state

    return optax.GradientTransformation(init, update)


def _adamw(learning_rate, b1, b2, eps, weight_decay):
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _sgd(learning_rate):
    return optax.sgd(learning_rate)


def _muon(learning_rate, b1, b2, eps, weight_decay, ns_steps, nesterov):
    """optax.contrib.muon; ``b1`` is Muon's momentum beta (and Adam's b1 on non-matrices)."""
    return optax.contrib.muon(learning_rate, ns_steps=ns_steps, beta=b1, eps=eps,
                              weight_decay=weight_decay, nesterov=nesterov, adam_b1=b1,
                              adam_b2=b2, adam_weight_decay=weight_decay)


def _newton_schulz(learning_rate, momentum, steps, step_size):
    """update = -lr NS(m), m <- momentum m + g: Eq. 52 with sigma = NS (Eq. 43-44)."""
    return optax.chain(optax.trace(decay=momentum),
                       scale_by_newton_schulz(steps, step_size),
                       optax.scale_by_learning_rate(learning_rate))


# The schedule of every recipe: 30 warm-up updates, cosine to 10% of the peak.
WARMUP_COSINE = dict(name="warmup_cosine", warmup_steps=30, end_factor=0.1)
# AdamW as the companion of the matrix optimizers (embeddings, head, vectors).
COMPANION = dict(name="adamw", learning_rate=3e-3, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, schedule=dict(WARMUP_COSINE))
NO_FALLBACK = "none"


def _recipe(learning_rate: float, **hyperparameters) -> dict:
    return dict(learning_rate=learning_rate, **hyperparameters, schedule=dict(WARMUP_COSINE))


OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": OptimizerBuilder(
        _adamw, dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0), below_one=("b1", "b2"),
        recipe=_recipe(3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)),
    "sgd": OptimizerBuilder(_sgd, {}, recipe=_recipe(0.3)),
    "momentum": OptimizerBuilder(momentum_lib.momentum, dict(momentum=0.9),
                                 recipe=_recipe(0.03, momentum=0.9)),
    "preconditioned_momentum": OptimizerBuilder(
        momentum_lib.preconditioned_momentum, dict(momentum=0.9, b2=0.999, eps=1e-8),
        below_one=("b2",), recipe=_recipe(3e-4, momentum=0.9, b2=0.95, eps=1e-8)),
    "delta_momentum": OptimizerBuilder(momentum_lib.delta_momentum, dict(momentum=0.9),
                                       recipe=_recipe(0.3, momentum=0.9), matrix=True),
    "dmgd": OptimizerBuilder(
        dmgd_lib.dmgd, dict(momentum=0.9, mlp_lr_scale=1.0, init_scale=1.0, hidden=8,
                            seed=0), static=("hidden", "seed"),
        recipe=_recipe(0.1, momentum=0.9, mlp_lr_scale=1.0, init_scale=1.0, hidden=8,
                       seed=0)),
    "muon": OptimizerBuilder(
        _muon, dict(b1=0.95, b2=0.999, eps=1e-8, weight_decay=0.0, ns_steps=5,
                    nesterov=True), static=("ns_steps", "nesterov"), below_one=("b1", "b2"),
        recipe=_recipe(0.02, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.0, ns_steps=5,
                       nesterov=True), matrix=True),
    "newton_schulz": OptimizerBuilder(
        _newton_schulz, dict(momentum=0.0, steps=5, step_size=0.5), static=("steps",),
        recipe=_recipe(0.05, momentum=0.9, steps=5, step_size=0.5), matrix=True),
    "m3": OptimizerBuilder(
        m3_lib.m3, dict(b1=0.9, b2=0.999, b3=0.9, alpha=1.0, eps=1e-8, decay1=1.0,
                        decay2=1.0, decay3=1.0, weight_decay=0.0, slow_every=8,
                        ns_steps=5, ns_step_size=0.5),
        static=("slow_every", "ns_steps"),
        recipe=_recipe(1e-5, b1=0.1, b2=0.05, b3=0.1, alpha=0.5, eps=1e-6, decay1=0.9,
                       decay2=0.95, decay3=0.9, weight_decay=0.0, slow_every=8, ns_steps=5,
                       ns_step_size=0.5), matrix=True),
}
MATRIX_OPTIMIZERS = tuple(name for name, b in OPTIMIZERS.items() if b.matrix)


def recipe(name: str) -> dict:
    """The whole spec a level gets when the command line names optimizer ``name``:
    learning rate, schedule, every hyperparameter and, for a matrix optimizer,
    its AdamW ``fallback``."""
    builder = OPTIMIZERS[name]
    spec = {"name": name, **copy.deepcopy(dict(builder.recipe))}
    if builder.matrix:
        spec["fallback"] = copy.deepcopy(COMPANION)
    return spec


def _as_dict(spec) -> dict:
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ConfigError(f"an optimizer spec must be a dict with a 'name', got {spec!r}")
    return dict(spec)


# Integer hyperparameters (counts, sizes, seeds) and their smallest allowed value.
INTEGER_MINIMUM = {"ns_steps": 1, "steps": 1, "slow_every": 1, "hidden": 0, "seed": 0}


def _check_value(where: str, key: str, value, default, below_one: bool = False) -> None:
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif key in INTEGER_MINIMUM:
        ok = (isinstance(value, int) and not isinstance(value, bool)
              and value >= INTEGER_MINIMUM[key])
        want = f"an integer >= {INTEGER_MINIMUM[key]}"
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and value >= 0 and (value < 1 or not below_one))
        want = "a number in [0, 1)" if below_one else "a finite number >= 0"
    if not ok:
        raise ConfigError(f"{where}.{key}={value!r} must be {want}")


def _did_you_mean(word, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def check_spec(spec, *, where: str = "optimizer") -> dict:
    """Validates an optimizer spec without building it; returns it as a plain dict.

    A wrong name or an unknown key says "did you mean"; values are checked as
    ``build_optimizer`` checks them; ``fallback`` (matrix optimizers only) is a
    spec of a non-matrix optimizer or ``"none"``.
    """
    spec = _as_dict(spec)
    name = spec.get("name")
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where}.name={name!r} is not a registered optimizer; "
                          f"{_did_you_mean(name, OPTIMIZERS)}choose one of {sorted(OPTIMIZERS)}")
    builder = OPTIMIZERS[name]
    allowed = ["name", "learning_rate", "schedule", *builder.defaults]
    if builder.matrix:
        allowed.append("fallback")
    for key in spec:
        if key not in allowed:
            extra = ("; 'fallback' applies to matrix optimizers only "
                     f"({', '.join(MATRIX_OPTIMIZERS)})" if key == "fallback" else "")
            raise ConfigError(f"{where}.{key}: unknown hyperparameter {key!r} for optimizer "
                              f"{name!r}; {_did_you_mean(key, allowed)}allowed: "
                              f"{allowed}{extra}")
    if "learning_rate" not in spec:
        raise ConfigError(f"{where}.learning_rate is missing for optimizer {name!r} (its "
                          f"recipe uses {builder.recipe.get('learning_rate')})")
    _check_value(where, "learning_rate", spec["learning_rate"], 0.0)
    for key, value in spec.items():
        if key in builder.defaults:
            _check_value(where, key, value, builder.defaults[key], key in builder.below_one)
    schedule_spec = spec.get("schedule")
    if schedule_spec is not None and hasattr(schedule_spec, "to_dict"):
        spec["schedule"] = schedule_spec = schedule_spec.to_dict()
    if schedule_spec is not None and not isinstance(schedule_spec, Mapping):
        raise ConfigError(f"{where}.schedule={schedule_spec!r} must be a dict such as "
                          f"{WARMUP_COSINE}")
    build_schedule(schedule_spec, 1.0, 1, where=f"{where}.schedule")
    fallback = spec.get("fallback")
    if fallback is not None and fallback != NO_FALLBACK:
        fallback = check_spec(fallback, where=f"{where}.fallback")
        if OPTIMIZERS[fallback["name"]].matrix:
            raise ConfigError(f"{where}.fallback.name={fallback['name']!r}: the fallback "
                              f"takes the parameters that are not matrices, so it cannot be "
                              f"a matrix optimizer; use e.g. 'adamw' (or fallback='none')")
        spec["fallback"] = fallback
    elif fallback is not None and not isinstance(fallback, str):
        raise ConfigError(f"{where}.fallback must be an optimizer spec or 'none'")
    elif isinstance(fallback, str) and fallback != NO_FALLBACK:
        raise ConfigError(f"{where}.fallback={fallback!r} must be an optimizer spec "
                          f"(dict) or 'none'")
    return spec


def fallback_spec(spec) -> dict | None:
    """The spec of the optimizer that takes a level's non-matrix parameters, or
    None when the level's optimizer takes all of them (not a matrix optimizer,
    or ``fallback="none"``)."""
    spec = _as_dict(spec)
    if not OPTIMIZERS[spec["name"]].matrix:
        return None
    fallback = spec.get("fallback", COMPANION)
    if fallback == NO_FALLBACK:
        return None
    return _as_dict(fallback)


def resolve_spec(spec, *, where: str = "optimizer") -> dict:
    """Every setting the spec runs with: the registry's defaults filled in, the
    schedule's too, and (matrix optimizers) the resolved fallback."""
    spec = check_spec(spec, where=where)
    builder = OPTIMIZERS[spec["name"]]
    out = {"name": spec["name"], "learning_rate": spec["learning_rate"]}
    out.update({k: spec.get(k, v) for k, v in builder.defaults.items()})
    schedule = dict(spec.get("schedule") or {"name": "constant"})
    schedule_name = schedule.get("name", "constant")
    out["schedule"] = {"name": schedule_name, **SCHEDULES.get(schedule_name, {}),
                       **{k: v for k, v in schedule.items() if k != "name"}}
    if builder.matrix:
        fallback = fallback_spec(spec)
        out["fallback"] = (NO_FALLBACK if fallback is None
                           else resolve_spec(fallback, where=f"{where}.fallback"))
    return out


def build_optimizer(spec, total_steps: int, *, where: str = "optimizer"
                    ) -> optax.GradientTransformation:
    """The transform named by ``spec['name']``, its learning rate from ``spec['schedule']``.

    ``total_steps`` is the number of updates the schedule spans; ``where`` is
    the config key used in error messages.  A ``fallback`` is not part of this
    transform: ``nl_jax.levels`` builds it for the level's non-matrix parameters.
    """
    spec = check_spec(spec, where=where)
    name = spec.pop("name")
    spec.pop("fallback", None)
    builder = OPTIMIZERS[name]
    schedule_spec = spec.pop("schedule", None)
    peak = spec.pop("learning_rate")
    schedule = build_schedule(schedule_spec, peak, total_steps, where=f"{where}.schedule")
    return builder(schedule, **spec)
