"""Titans MAG tiny: the CPU run (sliding-window attention gated by a linear
neural memory, SwiGLU MLP), d_model 128 x 2 layers x 4 heads.

Trains 300 steps of 16 x 128 tokens on the bundled corpus in a few minutes on
2 CPU cores.  Other variants: --config.model.mixer=titans_lmm|titans_mac|titans_mal.
"""

from nl_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.mixer = "titans_mag"
    c.model.mlp = "swiglu"
    c.model.memory = dict(
        kind="linear",        # "mlp": the deep memory of Titans section 3 (slower on CPU)
        objective="l2",       # ||M(k) - v||^2, Titans Eq. 12
        momentum=True,        # surprise momentum, Eq. 13
        weight_decay=True,    # forget gate alpha, Eq. 13
        dgd=False,
        mlp_depth=2,
        mlp_expansion=2,
        chunk_size=16,        # tokens per mini-batch of the inner GD (Eq. 16-18)
        path="auto",           # kernels on a TPU, XLA chunked path elsewhere
        remat_every=4,
        segment_len=32,       # MAC segment length (titans_mac only)
        n_persistent=4,       # learned persistent memory tokens (attention keys/values)
        window=32,            # sliding attention window (titans_mag / titans_mal)
        remat_segments=False,  # MAC: recompute each segment in backward (saves memory)
    )
    return c
