"""AdamW on every parameter every step (the reference the others are compared to).

The library ships this config in ``nl_jax/configs/optimizers/adamw.py`` (compared by
``bench optimizers`` and ``bench schedules``); this file returns it so that ``--config
experiments/optimizers/adamw.py`` and ``from experiments.optimizers.adamw import
get_config`` keep working.
"""

from nl_jax.configs.optimizers import adamw


def get_config():
    return adamw.get_config()
