"""Parameter-path patterns and level specs shared by the optimizer configs.

Patterns are matched with ``re.fullmatch`` against paths such as
``blocks/0/mixer/wq/kernel`` (see ``nl_jax/levels.py``).
"""

EMBEDDINGS = r"embed|unembed/.*"
NOT_EMBEDDINGS = r"(?!embed$|unembed/).*"
NORMS = r".*norm/scale"
MIXERS = r"blocks/\d+/mixer/.*"
MLPS = r"blocks/\d+/mlp/.*"

WARMUP_COSINE = dict(name="warmup_cosine", warmup_steps=30, end_factor=0.1)
# The AdamW companion of the matrix optimizers.  nl_jax/optim/registry.py's
# COMPANION (the default ``fallback`` of a muon/m3/newton_schulz/delta_momentum
# level) holds the same settings; tests/test_optim.py checks they agree.
COMPANION = dict(name="adamw", learning_rate=3e-3, b1=0.9, b2=0.95, weight_decay=0.1)


def adamw_embeddings(learning_rate: float = 3e-3) -> dict:
    """Embeddings (and an untied head) on AdamW every step: the usual Muon/M3 companion.

    A matrix optimizer's level already sends its embeddings, norms, biases,
    gates and convolution kernels to this AdamW (its ``fallback``); a separate
    level makes the split explicit in the config."""
    return dict(params=EMBEDDINGS, every=1, optimizer=dict(
        COMPANION, learning_rate=learning_rate, schedule=dict(WARMUP_COSINE)))
