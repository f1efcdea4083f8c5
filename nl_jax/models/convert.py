"""Convert a trained Transformer++ into Hope-Attention (NL section 7.3).

Every CMS level is initialised from the source model's MLP; attention,
norms and embeddings are copied.  With ``model.cms.lr = 0`` (or frozen
levels) the converted model computes:

* one level: exactly the source function, bit for bit;
* k sequential levels, ``exact=False`` (the paper's recipe: every level is a
  copy of the MLP): ``x + MLP(x) + MLP(x + MLP(x)) + ...``, NOT the source
  function -- the chain applies the MLP k times;
* k sequential levels, ``exact=True``: levels 2..k copy ``gate``/``up`` but
  start with ``down = 0``, so they add exactly 0 and the source function is
  reproduced bit for bit; in-context updates (``lr > 0``) then grow them;
* ``variant="independent"``: ``sum_l softmax(a)_l MLP(x) = MLP(x)`` in exact
  arithmetic (equal copies, weights summing to 1) but not bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.models.lm import LanguageModel

MLP_WEIGHTS = ("gate", "up", "down")


def _copy(target: dict, source: dict, path: str) -> None:
    """Copies every leaf of ``source`` into ``target`` (same structure/shapes)."""
    for key, value in source.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in target:
            raise ConfigError(f"cannot convert: parameter {where} of the source model has "
                              f"no counterpart in the target config")
        if isinstance(value, dict):
            _copy(target[key], value, where)
        else:
            if tuple(target[key].shape) != tuple(value.shape):
                raise ConfigError(f"cannot convert: {where} has shape {tuple(value.shape)} "
                                  f"in the source but {tuple(target[key].shape)} in the "
                                  f"target config (use the same model dims)")
            target[key] = value


def convert_to_cms(source_params: nnx.State, cfg, *, seed: int = 0,
                   exact: bool = False) -> LanguageModel:
    """Hope-Attention model whose CMS levels start from ``source_params``'s MLPs.

    ``source_params``: ``nnx.state(model, nnx.Param)`` of a Transformer++
    ``LanguageModel`` (``mlp="swiglu"``); ``cfg``: the target ``config.model``
    (``mixer="attention"``, ``mlp="cms"``, same dims, every level a SwiGLU
    block with the source ``d_ff``).  Parameters the source lacks (CMS learning
    rate gates, aggregation logits) keep their fresh initialisation from
    ``seed``.  ``exact``: see the module docstring.
    """
    if cfg.mlp != "cms":
        raise ConfigError(f"model.mlp must be 'cms' for a conversion target, got "
                          f"{cfg.mlp!r}")
    if cfg.get("cms", {}).get("block", "swiglu") != "swiglu":
        raise ConfigError("model.cms.block must be 'swiglu' to initialise from a "
                          "SwiGLU MLP")
    model = LanguageModel(cfg, rngs=nnx.Rngs(seed))
    target = nnx.state(model, nnx.Param).to_pure_dict()
    source = source_params.to_pure_dict()
    for i, block in source.get("blocks", {}).items():
        if "mlp" not in block or set(block["mlp"]) != set(MLP_WEIGHTS):
            raise ConfigError(f"cannot convert: source block {i} has no SwiGLU MLP "
                              f"(model.mlp must be 'swiglu' in the source)")
        mlp = block["mlp"]
        levels = target["blocks"][i]["mlp"]["levels"]
        for j in sorted(levels):
            level = {name: dict(weights) for name, weights in mlp.items()}
            if exact and j > 0:
                level["down"] = {"kernel": jnp.zeros_like(mlp["down"]["kernel"])}
            _copy(levels[j], level, f"blocks.{i}.mlp.levels.{j}")
        rest = {k: v for k, v in block.items() if k != "mlp"}
        _copy(target["blocks"][i], rest, f"blocks.{i}")
    _copy(target, {k: v for k, v in source.items() if k != "blocks"}, "")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, target)
    nnx.update(model, state)
    return model
