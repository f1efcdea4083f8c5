"""M3, Multi-scale Momentum Muon (NL Algorithm 1) on the blocks, AdamW on the embeddings.

Embeddings stay on AdamW: M3 divides an orthogonalised matrix by sqrt(V)
element by element, which is unbounded on the rows of tokens whose gradient
has been zero so far.  Norm scales go to the level's AdamW ``fallback`` (the
companion settings of common.py; ``fallback="none"`` would keep them on M3's
vector path): the same per-parameter optimizers as the one-flag swap
``--config.levels.default.optimizer.name=m3`` on nl_jax/configs/transformer/tiny.py.
The learning rate is small because an orthogonalised entry (~1/sqrt(d)) is
divided by sqrt(V) (~|g|): the step per entry is lr * O(1 / (sqrt(d) |g|)).
"""

from nl_jax.configs import base
from nl_jax.configs.optimizers import common


def get_config():
    c = base.get_config()
    c.levels = dict(
        embeddings=common.adamw_embeddings(),
        default=dict(params=common.NOT_EMBEDDINGS, every=1, optimizer=dict(
            name="m3", learning_rate=1e-5, b1=0.1, b2=0.05, b3=0.1, alpha=0.5, eps=1e-6,
            decay1=0.9, decay2=0.95, decay3=0.9, slow_every=8, ns_steps=5,
            schedule=dict(common.WARMUP_COSINE))),
    )
    return c
