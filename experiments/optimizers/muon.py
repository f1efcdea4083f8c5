"""Muon (optax.contrib.muon) on the blocks, AdamW on the embeddings.

Muon orthogonalises the momentum of every matrix (NL Eq. 52 with sigma =
Newton-Schulz); its vectors (norm scales) take its built-in Adam path.
"""

from experiments import base
from experiments.optimizers import common


def get_config():
    c = base.get_config()
    c.levels = dict(
        embeddings=common.adamw_embeddings(),
        default=dict(params=common.NOT_EMBEDDINGS, every=1, optimizer=dict(
            name="muon", learning_rate=0.02, b1=0.95, b2=0.95, weight_decay=0.0,
            schedule=dict(common.WARMUP_COSINE))),
    )
    return c
