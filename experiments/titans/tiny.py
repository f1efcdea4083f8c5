"""Titans MAG tiny: the CPU run (sliding-window attention gated by a linear
neural memory, SwiGLU MLP), d_model 128 x 2 layers x 4 heads.

The library ships this config in ``nl_jax/configs/titans/tiny.py`` (a model of ``bench
throughput``); this file returns it so that ``--config experiments/titans/tiny.py`` and
``from experiments.titans.tiny import get_config`` keep working.
"""

from nl_jax.configs.titans import tiny


def get_config():
    return tiny.get_config()
