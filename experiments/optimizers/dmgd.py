"""Deep Momentum GD (NL Eq. 50): an MLP momentum trained online on the gradients.

The library ships this config in ``nl_jax/configs/optimizers/dmgd.py`` (compared by
``bench optimizers``); this file returns it so that ``--config
experiments/optimizers/dmgd.py`` and ``from experiments.optimizers.dmgd import
get_config`` keep working.
"""

from nl_jax.configs.optimizers import dmgd


def get_config():
    return dmgd.get_config()
