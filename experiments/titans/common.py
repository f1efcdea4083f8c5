"""Shared shape of the Titans paper-scale configs (340m.py, 760m.py).

Training recipe of Titans section 5.1 / docs/equations.md section 6: Llama-2
tokenizer (32K vocabulary), 4K training length, AdamW lr 4e-4 with cosine
decay, weight decay 0.1, 0.5M-token batches (128 x 4096).
"""

from nl_jax.configs import base


def paper_config(d_model: int, n_layers: int, n_heads: int, d_ff: int, mixer: str):
    c = base.get_config()
    c.model.mixer = mixer
    c.model.mlp = "swiglu"
    c.model.d_model = d_model
    c.model.n_layers = n_layers
    c.model.n_heads = n_heads
    c.model.d_ff = d_ff
    c.model.memory = dict(
        kind="mlp",            # deep memory, L_M = 2 (Titans section 3 / 5.1)
        objective="l2",
        momentum=True,
        weight_decay=True,
        dgd=False,
        mlp_depth=2,
        mlp_expansion=4,       # hidden width 4 x head_dim (project choice)
        chunk_size=64,         # inner mini-batch size (project choice; divides 4096)
        path="auto",           # kernels on a TPU, XLA chunked path elsewhere
        remat_every=4,
        segment_len=512,       # MAC segment length (project choice; divides 4096)
        n_persistent=4,        # persistent memory tokens (project choice)
        window=512,            # MAG/MAL sliding window (project choice)
        remat_segments=True,   # MAC: recompute each segment in backward (memory)
        grad_clip=1.0,         # per-token step norm bound (project choice): without it
                               # the 2-layer memory's inner loop diverged within 6 chunks
                               # on real text at initialisation (NaN loss at step 1)
    )
    base.paper_recipe(c, train_tokens=30_000_000_000)   # Titans 760M budget
    return c
