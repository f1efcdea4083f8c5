"""AdamW on every parameter every step (the reference the others are compared to)."""

from nl_jax.configs import base
from nl_jax.configs.optimizers import common


def get_config():
    c = base.get_config()
    c.levels = dict(default=dict(params=".*", every=1, optimizer=dict(
        name="adamw", learning_rate=3e-3, b1=0.9, b2=0.95, weight_decay=0.1,
        schedule=dict(common.WARMUP_COSINE))))
    return c
