"""Prints the parameter count of every Hope config without allocating it.

    python -m experiments.hope.count_params

Builds each model with ``nnx.eval_shape`` (shapes only) and counts the
``nnx.Param`` leaves.
"""

from __future__ import annotations

import importlib.util
import os

import jax
from flax import nnx

from nl_jax.models.lm import LanguageModel, param_count

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("tiny.py", "attention.py", "340m.py", "760m.py", "1_3b.py")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_hope_{name[:-3]}",
                                                  os.path.join(HERE, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def count(model_cfg) -> int:
    abstract = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
    return param_count(abstract)


def main() -> None:
    for name in CONFIGS:
        cfg = load(name)
        n = count(cfg.model)
        print(f"{name:12s} {cfg.model.mixer:15s} {n / 1e6:9.2f}M  "
              f"(d_model={cfg.model.d_model}, layers={cfg.model.n_layers}, "
              f"heads={cfg.model.n_heads}, d_ff={cfg.model.d_ff}, "
              f"cms periods={tuple(cfg.model.cms.periods)})")


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main()
