"""Train state: built abstractly, then initialised directly sharded.

The state is a plain pytree ``{"step", "params", "opt_state"}``: ``params`` is
the ``nnx.State`` of every ``nnx.Param`` (the outer-level weights), the model's
structure lives in a static ``graphdef``.  ``init_train_state`` never builds
the full model on one device: it evaluates shapes, derives shardings from the
logical axis names, and jits the initialiser with those ``out_shardings``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from nl_jax.models.lm import LanguageModel
from nl_jax.train.mesh import param_shardings, replicated


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static half of the model: structure + non-trainable variables."""
    graphdef: Any
    rest: Any

    def bind(self, params) -> LanguageModel:
        return nnx.merge(self.graphdef, params, self.rest)


def build_model(model_cfg, seed: int) -> LanguageModel:
    return LanguageModel(model_cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(model_cfg, seed: int = 0):
    """(ModelDef, abstract params) without allocating any weights."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelDef(graphdef, rest), params


def _init_fn(model_cfg, optimizer: optax.GradientTransformation, seed: int):
    def init():
        model = build_model(model_cfg, seed)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": optimizer.init(params)}
        return state, rest
    return init


def train_state_shardings(model_cfg, optimizer: optax.GradientTransformation,
                          seed: int, mesh: Mesh, rules):
    """(model_def, abstract state, state shardings, rest shardings); allocates nothing."""
    model_def, abstract_params = abstract_model(model_cfg, seed)
    p_shard = param_shardings(abstract_params, mesh, rules)
    abstract_state, abstract_rest = jax.eval_shape(_init_fn(model_cfg, optimizer, seed))
    opt_shard = opt_state_shardings(abstract_state["opt_state"], abstract_params,
                                    p_shard, mesh)
    shardings = {"step": replicated(mesh), "params": p_shard, "opt_state": opt_shard}
    rest_shard = jax.tree.map(lambda _: replicated(mesh), abstract_rest)
    return model_def, abstract_state, shardings, rest_shard


def prepare_train_state(model_cfg, optimizer: optax.GradientTransformation,
                        seed: int, mesh: Mesh, rules):
    """(model_def, abstract state, state shardings, init): ``init()`` allocates the
    initial state sharded on the mesh; until then nothing of it exists, so a run
    that restores a checkpoint never holds a second, random copy of the state."""
    model_def, abstract_state, shardings, rest_shard = train_state_shardings(
        model_cfg, optimizer, seed, mesh, rules)
    init_fn = _init_fn(model_cfg, optimizer, seed)
    rest = jax.jit(lambda: init_fn()[1], out_shardings=rest_shard)()

    def init() -> dict:
        return jax.jit(lambda: init_fn()[0], out_shardings=shardings)()

    return ModelDef(model_def.graphdef, rest), abstract_state, shardings, init


def init_train_state(model_cfg, optimizer: optax.GradientTransformation,
                     seed: int, mesh: Mesh, rules) -> tuple[ModelDef, dict, dict]:
    """Returns (model_def, state, state_shardings); state lives sharded on mesh."""
    model_def, _, shardings, init = prepare_train_state(model_cfg, optimizer, seed, mesh,
                                                        rules)
    return model_def, init(), shardings


def opt_state_shardings(abstract_opt_state, abstract_params, p_shard, mesh: Mesh):
    """Optimizer leaves shaped like a parameter inherit its sharding.

    optax states hold param-shaped trees (moments, accumulators) next to
    scalars (counts, hyperparameters); a leaf is matched to a parameter by
    its tree-path suffix and shape, anything else is replicated.
    """
    by_suffix: dict[tuple, Any] = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                jax.tree.leaves(p_shard), strict=True):
        by_suffix[(_path_key(path), leaf.shape)] = sh

    def pick(path, leaf):
        key = _path_key(path)
        for n in range(len(key), 0, -1):
            sh = by_suffix.get((key[-n:], leaf.shape))
            if sh is not None:
                return sh
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _path_key(path) -> tuple:
    out = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                out.append(str(getattr(p, attr)))
                break
        else:
            out.append(str(p))
    return tuple(out)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
