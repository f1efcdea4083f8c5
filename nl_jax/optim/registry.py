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
"""

from __future__ import annotations

import dataclasses
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
from nl_jax.optim.schedules import build_schedule


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


OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": OptimizerBuilder(
        _adamw, dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0), below_one=("b1", "b2")),
    "sgd": OptimizerBuilder(_sgd, {}),
    "momentum": OptimizerBuilder(momentum_lib.momentum, dict(momentum=0.9)),
    "preconditioned_momentum": OptimizerBuilder(
        momentum_lib.preconditioned_momentum, dict(momentum=0.9, b2=0.999, eps=1e-8),
        below_one=("b2",)),
    "delta_momentum": OptimizerBuilder(momentum_lib.delta_momentum, dict(momentum=0.9)),
    "dmgd": OptimizerBuilder(
        dmgd_lib.dmgd, dict(momentum=0.9, mlp_lr_scale=1.0, init_scale=1.0, hidden=8,
                            seed=0), static=("hidden", "seed")),
    "muon": OptimizerBuilder(
        _muon, dict(b1=0.95, b2=0.999, eps=1e-8, weight_decay=0.0, ns_steps=5,
                    nesterov=True), static=("ns_steps", "nesterov"), below_one=("b1", "b2")),
    "newton_schulz": OptimizerBuilder(
        _newton_schulz, dict(momentum=0.0, steps=5, step_size=0.5), static=("steps",)),
    "m3": OptimizerBuilder(
        m3_lib.m3, dict(b1=0.9, b2=0.999, b3=0.9, alpha=1.0, eps=1e-8, decay1=1.0,
                        decay2=1.0, decay3=1.0, weight_decay=0.0, slow_every=8,
                        ns_steps=5, ns_step_size=0.5),
        static=("slow_every", "ns_steps")),
}


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


def build_optimizer(spec, total_steps: int, *, where: str = "optimizer"
                    ) -> optax.GradientTransformation:
    """The transform named by ``spec['name']``, its learning rate from ``spec['schedule']``.

    ``total_steps`` is the number of updates the schedule spans; ``where`` is
    the config key used in error messages.
    """
    spec = _as_dict(spec)
    name = spec.pop("name", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where}.name={name!r} is not a registered optimizer; choose "
                          f"one of {sorted(OPTIMIZERS)}")
    builder = OPTIMIZERS[name]
    schedule_spec = spec.pop("schedule", None)
    if "learning_rate" not in spec:
        raise ConfigError(f"{where}.learning_rate is missing for optimizer {name!r}")
    peak = spec.pop("learning_rate")
    _check_value(where, "learning_rate", peak, 0.0)
    allowed = ["learning_rate", "schedule", *builder.defaults]
    for key, value in spec.items():
        if key not in builder.defaults:
            raise ConfigError(f"{where}.{key}: unknown hyperparameter {key!r} for optimizer "
                              f"{name!r}; allowed: {allowed}")
        _check_value(where, key, value, builder.defaults[key], key in builder.below_one)
    if schedule_spec is not None and hasattr(schedule_spec, "to_dict"):
        schedule_spec = schedule_spec.to_dict()
    schedule = build_schedule(schedule_spec, peak, total_steps, where=f"{where}.schedule")
    return builder(schedule, **spec)
