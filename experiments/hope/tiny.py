"""Hope tiny: the CPU config (self-modifying Titans + CMS).

The library ships this config in ``nl_jax/configs/hope/tiny.py`` (the default config of
``python -m nl_jax train``); this file returns it so that ``--config
experiments/hope/tiny.py`` and ``from experiments.hope.tiny import get_config`` keep
working.
"""

from nl_jax.configs.hope import tiny


def get_config():
    return tiny.get_config()
