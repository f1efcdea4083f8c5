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

Matrix optimizers (muon, m3, newton_schulz, delta_momentum) update the
weight matrices of the level (2-D, or stacks of matrices over leading axes);
the level's other parameters (``param_kind``: embeddings and output head,
norms, biases, gates, convolution kernels, per-head readout vectors) go to the
optimizer spec's ``fallback`` (default: AdamW with the companion settings of
``experiments/optimizers/common.py``; ``fallback="none"``: the matrix
optimizer takes them too).  The fallback runs at the level's period, as the
partition label ``<level>.fallback`` (so ``level_metrics`` reports
``lr/<level>.fallback`` too).  ``describe``/``summary`` print the resolved
tree.

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
from nl_jax.optim import build_optimizer, check_spec, fallback_spec

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


FALLBACK = ".fallback"   # partition label of a level's non-matrix parameters

# Logical axis names (nl_jax.sharding) of parameters that are not weight matrices.
NON_MATRIX_AXES = {"vocab": "embedding/head", "conv_window": "conv kernel",
                   "persistent": "persistent tokens", "norm": "norm scale"}
# An axis that indexes heads: a tensor with it among its last two axes is a set of
# per-head vectors (gates, readouts), not a stack of matrices.
PER_HEAD_AXES = ("memory_heads",)


def param_kind(path: str, shape, names=None) -> str:
    """``"matrix"`` for a weight matrix (2-D, or a stack of matrices over its
    leading axes), else why not: what a matrix optimizer's level sends to its
    fallback.  ``names`` are the parameter's logical axis names when known."""
    if len(shape) < 2:
        if "norm" in path:
            return "norm scale"
        return "bias" if "bias" in path.rsplit("/", 1)[-1] else (
            "vector" if len(shape) == 1 else "scalar")
    if names:
        for axis, why in NON_MATRIX_AXES.items():
            if axis in names:
                return why
        if any(n in PER_HEAD_AXES for n in tuple(names)[-2:]):
            return "per-head gate/readout"
        return "matrix"
    if re.fullmatch(r"embed|unembed/.*", path):
        return "embedding/head"
    if "conv" in path:
        return "conv kernel"
    return "matrix"


def param_table(params) -> list[tuple[str, tuple[int, ...], tuple | None]]:
    """``(path, shape, logical axis names or None)`` of every parameter."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_variable)
    out = []
    for path, leaf in zip(param_paths(params), leaves, strict=True):
        names = None
        if _is_variable(leaf):
            names = getattr(leaf, "out_sharding", None)
            names = tuple(names) if names else None
        out.append((path, tuple(jnp.shape(leaf)), names))
    return out


def assign_labels(levels_cfg, params) -> tuple[dict[str, str], dict[str, str]]:
    """(``{path: level}``, ``{path: partition label}``): the label is the level's
    name, or ``<level>.fallback`` for a non-matrix parameter of a level whose
    matrix optimizer has a fallback."""
    owner = assign_levels(levels_cfg, params)
    label = dict(owner)
    for path, shape, names in param_table(params):
        level = _as_dict(levels_cfg[owner[path]])
        if level.get("every", 1) == FROZEN or "optimizer" not in level:
            continue
        spec = check_spec(level["optimizer"], where=f"levels.{owner[path]}.optimizer")
        if fallback_spec(spec) is not None and param_kind(path, shape, names) != "matrix":
            label[path] = owner[path] + FALLBACK
    return owner, label


def build_levels(levels_cfg, params, *, total_steps: int, grad_clip_norm: float = 0.0
                 ) -> optax.GradientTransformation:
    """One optax transform for all outer levels (see the module docstring).

    ``params`` may hold arrays or ShapeDtypeStructs (only paths, shapes and
    logical axis names are read).
    """
    owner, label = assign_labels(levels_cfg, params)
    used = set(label.values())
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
        updates = max(total_steps // every, 1)
        where = f"levels.{name}.optimizer"
        inner = build_optimizer(level["optimizer"], updates, where=where)
        if name in used:
            transforms[name] = every_k_steps(inner, every)
        if name + FALLBACK in used:
            fallback = fallback_spec(level["optimizer"])
            transforms[name + FALLBACK] = every_k_steps(
                build_optimizer(fallback, updates, where=where + ".fallback"), every)
    labels = lambda tree: _map_paths(label.__getitem__, tree)  # noqa: E731
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


# ----------------------------------------------------------------------------
# The nested-levels tree (``python -m nl_jax levels``, printed by ``train``)
# ----------------------------------------------------------------------------

def _period_key(every) -> float:
    """Slowest first: frozen, then the longest period."""
    return float("inf") if every == FROZEN else float(every)


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def step_clock_levels(levels_cfg, params, total_steps: int) -> list[dict]:
    """The outer levels, slowest first: regex, period, resolved optimizer (and
    fallback), schedule span, and every parameter with its shape, size, kind
    (``param_kind``) and the optimizer that updates it."""
    from nl_jax.optim import resolve_spec
    owner, label = assign_labels(levels_cfg, params)
    table = param_table(params)
    out = []
    for name, level in levels_cfg.items():
        level = _as_dict(level)
        every = _parse_every(name, level.get("every", 1))
        spec = (resolve_spec(level["optimizer"], where=f"levels.{name}.optimizer")
                if "optimizer" in level else None)
        rows = []
        for path, shape, names in table:
            if owner[path] != name:
                continue
            kind = param_kind(path, shape, names)
            if every == FROZEN:
                runs = "frozen"
            elif label[path].endswith(FALLBACK):
                runs = spec["fallback"]["name"] + " (fallback)"
            else:
                runs = spec["name"]
            rows.append(dict(path=path, shape=list(shape), size=_size(shape), kind=kind,
                             optimizer=runs))
        out.append(dict(
            name=name, params=level.get("params"), every=every,
            updates=0 if every == FROZEN else max(total_steps // every, 1),
            optimizer=spec, count=sum(r["size"] for r in rows), parameters=rows))
    out.sort(key=lambda lv: -_period_key(lv["every"]))
    return out


def _mixer_levels(model_cfg, mixer: str, count) -> list[dict]:
    """The in-context levels of one token mixer (``token_clock_levels``)."""
    out = []
    if str(mixer).startswith("titans_"):
        from nl_jax.models import titans
        spec = titans.memory_spec_from_config(model_cfg)
        rule = ["gradient step on the objective"]
        if spec.momentum:
            rule.append("surprise momentum (eta_t, Titans Eq. 13)")
        if spec.weight_decay:
            rule.append("forget gate (alpha_t)")
        if spec.dgd:
            rule.append("delta/DGD preconditioner (NL Eq. 57)")
        mapping = spec.kind if spec.kind == "linear" else (
            f"mlp (depth {spec.mlp_depth}, hidden {spec.mlp_expansion} x head_dim)")
        out.append(dict(
            name="titans memory", where="blocks/*/mixer", map=mapping,
            objective=spec.objective, update=", ".join(rule), chunk=spec.chunk_size,
            period=spec.chunk_size,
            inner_lr="theta_t: data-dependent sigmoid gate per head",
            bounds=(f"per-token step norm <= {spec.grad_clip}" if spec.grad_clip
                    else "none"),
            extra={k: titans._memory_dict(model_cfg).get(k)
                   for k in titans.TITANS_KEYS if k in titans._memory_dict(model_cfg)},
            count=count(r".*init_params/.*")))
    from nl_jax.models import lm
    from nl_jax.models import self_modifying as sm
    mixer_cls = lm._resolve(lm.MIXERS, "mixer", mixer)
    if issubclass(mixer_cls, sm.SelfModifyingTitans):   # Hope and its presets (baselines)
        c = sm._config(model_cfg, mixer_cls.PRESET)
        spec = sm.spec_from_options(c)
        rule = ["gradient step"] + ([f"DGD ({spec.decay_form} form)"] if spec.dgd else []) + (
            ["momentum"] if spec.momentum else []) + (["decay alpha_t"] if spec.decay else [])
        rule += [f"read {spec.read} the write",
                 "step eta/C" if spec.step_scale == "chunk" else "step eta per token"]
        mapping = (f"mlp (hidden {c['hidden_mult']} x head_dim)" if c["memory"] == "mlp"
                   else {"linear": "linear", "linear_ln": "x + LN(W x)"}[c["memory"]])
        for box in (*spec.adaptive, "memory"):
            chunk = c["memory_chunk_size"] if box == "memory" else c["chunk_size"]
            out.append(dict(
                name=f"self-modifying M_{box}", where="blocks/*/mixer/memories/" + box,
                map=mapping,
                objective=(c["objective"] + (" to self-generated values M_" + box + "(v)"
                                             if spec.generated_values else " to v_t")),
                update=", ".join(rule), chunk=chunk, period=chunk,
                inner_lr=f"eta_t = {c['lr']} * sigmoid(...) (adaptive)",
                bounds=(f"inner gradient clip {c['grad_clip']}" if c["grad_clip"]
                        else "none"),
                count=count(rf"blocks/\d+/mixer/memories/{box}/.*")))
    return out


def token_clock_levels(model_cfg, params) -> list[dict]:
    """The in-context levels of the model (updated inside each sequence),
    slowest first: Titans memories, Hope's self-modifying memories, CMS levels."""
    paths = {p: _size(s) for p, s, _ in param_table(params)}

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(n for p, n in paths.items() if rx.fullmatch(p))

    out = []
    from nl_jax.models.lm import layer_mixers
    mlp = model_cfg.mlp
    for mixer in dict.fromkeys(layer_mixers(model_cfg)):   # each distinct layer mixer
        out += _mixer_levels(model_cfg, mixer, count)
    if mlp == "cms":
        cms = _as_dict(model_cfg.get("cms") or {})
        periods = cms.get("periods", (FROZEN,))
        periods = (periods,) if isinstance(periods, (str, int)) else tuple(periods)
        if not cms.get("use_cms", True):
            periods = (FROZEN,)
        d_ff = cms.get("d_ff", model_cfg.d_ff)
        for i, period in enumerate(periods):
            width = d_ff[i] if isinstance(d_ff, (tuple, list)) else d_ff
            frozen = period == FROZEN
            out.append(dict(
                name=f"CMS level {i}", where=f"blocks/*/mlp/levels/{i}",
                map=f"{cms.get('block', 'swiglu')} (d_ff {width})",
                objective=("none: trained on the step clock only" if frozen else
                           f"l2 to the {cms.get('target', 'input')} "
                           f"({cms.get('variant', 'sequential')} CMS)"),
                update="frozen in context" if frozen else "gradient step per chunk",
                chunk=None if frozen else period, period=period,
                inner_lr=None if frozen else
                f"eta_t = {cms.get('lr', 1e-2)} * sigmoid(w.x + b)",
                bounds=None if frozen else
                f"trust ratio max_update={cms.get('max_update', 0.005)}",
                count=count(rf"blocks/\d+/mlp/levels/{i}/.*")))
    out.sort(key=lambda lv: -_period_key(lv["period"]))
    return out


def levels_tree(config, params=None) -> dict:
    """The whole nested-levels tree of ``config`` (abstract shapes only)."""
    if params is None:
        from nl_jax.models.lm import LanguageModel
        model = nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
    total = sum(_size(s) for _, s, _ in param_table(params))
    tree = dict(model=dict(mixer=config.model.mixer, mlp=config.model.mlp, parameters=total),
                step_clock=step_clock_levels(config.levels, params, config.train.steps),
                token_clock=token_clock_levels(config.model, params))
    teach = config.get("teach_signal")
    if teach is not None and teach.get("params"):
        tree["token_clock"].insert(0, dict(
            name="teach signal", where=teach.params, map="the selected weights",
            objective="LM loss of each segment", update="one SGD step per segment",
            chunk=teach.segment, period=teach.segment, inner_lr=teach.lr,
            bounds=f"trust ratio max_update={teach.max_update}", count=None))
    return tree


def _fmt_settings(spec: dict) -> str:
    parts = [f"{k}={v}" for k, v in spec.items() if k not in ("name", "schedule", "fallback")]
    sched = spec.get("schedule") or {}
    args = ", ".join(f"{k}={v}" for k, v in sched.items() if k != "name")
    parts.append(f"schedule={sched.get('name', 'constant')}({args})")
    return f"{spec['name']}: " + " ".join(parts)


def _group_rows(rows: list[dict]) -> list[tuple[str, list, int, int, str, str]]:
    """Rows with the block index folded: ``blocks/*/...`` x layers."""
    groups: dict[tuple, list] = {}
    for r in rows:
        key = (re.sub(r"^blocks/\d+/", "blocks/*/", r["path"]), tuple(r["shape"]),
               r["kind"], r["optimizer"])
        groups.setdefault(key, []).append(r)
    return [(k[0], list(k[1]), len(v), sum(r["size"] for r in v), k[2], k[3])
            for k, v in groups.items()]


def format_tree(tree: dict, short: bool = False) -> str:
    """Text of ``levels_tree``; ``short``: one line per level and optimizer."""
    m = tree["model"]
    lines = [f"model {m['mixer']} + {m['mlp']}: {m['parameters']:,} parameters",
             "step clock (config.levels; one update per `every` train steps), "
             "slowest first:"]
    for lv in tree["step_clock"]:
        every = "never (frozen)" if lv["every"] == FROZEN else f"every {lv['every']}"
        lines.append(f"  {lv['name']}: params={lv['params']!r} {every}, "
                     f"{len(lv['parameters'])} tensors, {lv['count']:,} parameters"
                     + ("" if lv["every"] == FROZEN else
                        f", {lv['updates']} updates"))
        spec = lv["optimizer"]
        if spec is not None:
            by_opt: dict[str, int] = {}
            for r in lv["parameters"]:
                by_opt[r["optimizer"]] = by_opt.get(r["optimizer"], 0) + r["size"]
            lines.append(f"    optimizer {_fmt_settings(spec)}"
                         + (f"  [{by_opt.get(spec['name'], 0):,} parameters]"
                            if lv["every"] != FROZEN else " (unused: frozen)"))
            fb = spec.get("fallback")
            if isinstance(fb, dict):
                n = by_opt.get(fb["name"] + " (fallback)", 0)
                lines.append(f"    fallback  {_fmt_settings(fb)}  [{n:,} parameters: "
                             f"not matrices]")
            elif fb == "none":
                lines.append("    fallback  none: the matrix optimizer takes every "
                             "parameter")
        if not short:
            for path, shape, layers, size, kind, runs in _group_rows(lv["parameters"]):
                times = f" x{layers}" if layers > 1 else ""
                lines.append(f"      {path:44s} {tuple(shape)!s:16s}{times:5s} "
                             f"{size:>11,}  {kind:22s} -> {runs}")
    lines.append("token clock (in-context levels of the model, inside each sequence), "
                 "slowest first:")
    if not tree["token_clock"]:
        lines.append("  none (attention and MLP blocks learn on the step clock only)")
    for lv in tree["token_clock"]:
        count = "" if lv.get("count") is None else f", {lv['count']:,} parameters (M_0)"
        period = (f"every {lv['period']} tokens" if lv["period"] != FROZEN
                  else "never (frozen in context)")
        lines.append(f"  {lv['name']} ({lv['where']}): {period}{count}")
        if not short:
            for key in ("map", "objective", "update", "inner_lr", "bounds"):
                if lv.get(key) is not None:
                    lines.append(f"      {key:10s} {lv[key]}")
            for key, value in (lv.get("extra") or {}).items():
                lines.append(f"      {key:10s} {value}")
    return "\n".join(lines)


def summary(config, params=None) -> str:
    """The short form of the tree, for the start of ``train``."""
    return format_tree(levels_tree(config, params), short=True)
