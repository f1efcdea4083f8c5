"""Muon (optax.contrib.muon) on the blocks' matrices, AdamW on everything else.

Muon orthogonalises the momentum of every matrix (NL Eq. 52 with sigma =
Newton-Schulz).  The default level's norm scales go to its AdamW ``fallback``
(the companion settings of common.py), like the embeddings level: the same
optimizer per parameter as the one-flag swap
``--config.levels.default.optimizer.name=muon`` on nl_jax/configs/transformer/tiny.py
(``python -m nl_jax levels --config nl_jax/configs/optimizers/muon.py`` shows it).
"""

from nl_jax.configs import base
from nl_jax.configs.optimizers import common


def get_config():
    c = base.get_config()
    c.levels = dict(
        embeddings=common.adamw_embeddings(),
        default=dict(params=common.NOT_EMBEDDINGS, every=1, optimizer=dict(
            name="muon", learning_rate=0.02, b1=0.95, b2=0.95, weight_decay=0.0,
            schedule=dict(common.WARMUP_COSINE))),
    )
    return c
