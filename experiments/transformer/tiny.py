"""Transformer++ tiny: the CPU baseline (attention + SwiGLU), ~0.8M parameters.

The library ships this config in ``nl_jax/configs/transformer/tiny.py`` (a model of
``bench throughput``); this file returns it so that ``--config
experiments/transformer/tiny.py`` and ``from experiments.transformer.tiny import
get_config`` keep working.
"""

from nl_jax.configs.transformer import tiny


def get_config():
    return tiny.get_config()
