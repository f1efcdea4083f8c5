"""Parameter counts of config files without allocating weights (nnx.eval_shape).

    python -m experiments.count_params experiments/hope/*.py experiments/titans/*.py
"""

import importlib.util
import os
import sys

from flax import nnx

from nl_jax.models.lm import LanguageModel, param_count


def load(path: str):
    name = "_count_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _count_layers(model_cfg, n_layers: int) -> int:
    cfg = model_cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.n_layers = n_layers
    return param_count(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))


def count(model_cfg) -> int:
    """Exact: the blocks repeat with the period of the mixer pattern (k = 1 unless
    ``model.mixer`` lists several), so a model of L layers has the parameters of
    k layers plus L / k - 1 times the difference to 2k (building k and 2k layers
    abstractly is ~10x faster than all of a paper-scale model's)."""
    period = len(str(model_cfg.mixer).split(","))
    one = _count_layers(model_cfg, period)
    if model_cfg.n_layers == period:
        return one
    return one + (model_cfg.n_layers // period - 1) * (_count_layers(model_cfg, 2 * period)
                                                      - one)


def describe(path: str, model_cfg) -> str:
    return (f"{path:32s} {model_cfg.mixer:15s} {count(model_cfg) / 1e6:9.2f}M  "
            f"(d_model={model_cfg.d_model}, layers={model_cfg.n_layers}, "
            f"heads={model_cfg.n_heads}, d_ff={model_cfg.d_ff})")


def main(paths) -> None:
    for path in paths:
        if os.path.basename(path) in ("__init__.py", "common.py", "count_params.py"):
            continue
        print(describe(path, load(path).model))


if __name__ == "__main__":
    main(sys.argv[1:])
