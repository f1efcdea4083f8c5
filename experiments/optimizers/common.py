"""Parameter-path patterns and level specs shared by the optimizer configs.

Defined in ``nl_jax/configs/optimizers/common.py`` (the bundled optimizer swaps
use them); re-exported here for the configs of this folder and older ones.
"""

from nl_jax.configs.optimizers.common import (
    COMPANION,
    EMBEDDINGS,
    MIXERS,
    MLPS,
    NORMS,
    NOT_EMBEDDINGS,
    WARMUP_COSINE,
    adamw_embeddings,
)

__all__ = ["COMPANION", "EMBEDDINGS", "MIXERS", "MLPS", "NORMS", "NOT_EMBEDDINGS",
           "WARMUP_COSINE", "adamw_embeddings"]
