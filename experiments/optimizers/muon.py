"""Muon (optax.contrib.muon) on the blocks' matrices, AdamW on everything else.

The library ships this config in ``nl_jax/configs/optimizers/muon.py`` (compared by
``bench optimizers``); this file returns it so that ``--config
experiments/optimizers/muon.py`` and ``from experiments.optimizers.muon import
get_config`` keep working.
"""

from nl_jax.configs.optimizers import muon


def get_config():
    return muon.get_config()
