"""Deep Momentum GD (NL Eq. 50): an MLP momentum trained online on the gradients."""

from nl_jax.configs import base
from nl_jax.configs.optimizers import common


def get_config():
    c = base.get_config()
    c.levels = dict(default=dict(params=".*", every=1, optimizer=dict(
        name="dmgd", learning_rate=0.1, momentum=0.9, hidden=8, mlp_lr_scale=1.0,
        init_scale=1.0, schedule=dict(common.WARMUP_COSINE))))
    return c
