"""Delta-rule momentum (NL Eq. 48-49) on every parameter.

The library ships this config in ``nl_jax/configs/optimizers/delta_momentum.py``
(compared by ``bench optimizers``); this file returns it so that ``--config
experiments/optimizers/delta_momentum.py`` and ``from
experiments.optimizers.delta_momentum import get_config`` keep working.
"""

from nl_jax.configs.optimizers import delta_momentum


def get_config():
    return delta_momentum.get_config()
