"""M3, Multi-scale Momentum Muon (NL Algorithm 1) on the blocks, AdamW on the embeddings.

The library ships this config in ``nl_jax/configs/optimizers/m3.py`` (compared by
``bench optimizers``); this file returns it so that ``--config
experiments/optimizers/m3.py`` and ``from experiments.optimizers.m3 import get_config``
keep working.
"""

from nl_jax.configs.optimizers import m3


def get_config():
    return m3.get_config()
