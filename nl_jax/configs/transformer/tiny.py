"""Transformer++ tiny: the CPU baseline (attention + SwiGLU), ~0.8M parameters.

Trains 300 steps of 16 x 128 tokens on the bundled corpus in a few minutes on
2 CPU cores.
"""

from nl_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.mixer = "attention"
    c.model.mlp = "swiglu"
    return c
