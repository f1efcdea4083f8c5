"""Two step-clock frequencies: fast embeddings/norms and attention, slow MLPs.

  fast     embeddings and norm scales   AdamW   every step
  mixers   token mixers (attention)     M3      every step
  mlps     channel mixers (MLP / CMS)   AdamW   every 4 steps (mean gradient)
"""

from nl_jax.configs import base
from nl_jax.configs.optimizers import common


def get_config():
    c = base.get_config()
    c.levels = dict(
        fast=dict(params=f"{common.EMBEDDINGS}|{common.NORMS}", every=1, optimizer=dict(
            name="adamw", learning_rate=3e-3, b1=0.9, b2=0.95, weight_decay=0.1,
            schedule=dict(common.WARMUP_COSINE))),
        mixers=dict(params=common.MIXERS, every=1, optimizer=dict(
            name="m3", learning_rate=1e-5, b1=0.1, b2=0.05, b3=0.1, alpha=0.5, eps=1e-6,
            decay1=0.9, decay2=0.95, decay3=0.9, slow_every=8,
            schedule=dict(common.WARMUP_COSINE))),
        mlps=dict(params=common.MLPS, every=4, optimizer=dict(
            name="adamw", learning_rate=3e-3, b1=0.9, b2=0.95, weight_decay=0.1,
            schedule=dict(common.WARMUP_COSINE))),
    )
    return c
