"""Delta-rule momentum (NL Eq. 48-49) on every parameter.

The decay a I - G^T G contracts because gradients are clipped to global norm
1 (``train.grad_clip_norm``) before the levels.
"""

from nl_jax.configs import base
from nl_jax.configs.optimizers import common


def get_config():
    c = base.get_config()
    c.levels = dict(default=dict(params=".*", every=1, optimizer=dict(
        name="delta_momentum", learning_rate=0.3, momentum=0.9,
        schedule=dict(common.WARMUP_COSINE))))
    return c
