"""Shared shape of the Hope paper-scale configs (340m.py, 760m.py, 1_3b.py).

Training recipe of NL / Titans section 5.1 (docs/equations.md section 6): Llama-2
sentencepiece tokenizer (32K vocabulary, path given by the user), 4K training
length, AdamW lr 4e-4 with cosine decay, weight decay 0.1, 0.5M-token batches
(128 x 4096).  Shapes (d_model x layers x heads) are the Transformer++ shapes
of the Titans/GDN baselines at each size; the CMS width ``d_ff`` is chosen per
size so that the total parameter count is within 5% of the name (run
``python -m experiments.hope.count_params``).
"""

from nl_jax.configs import base

# CMS periods in tokens (project choice): a level updated every 512 tokens, one
# every 2048 (NL 7.1 recommends the lowest in-context frequency around 2K
# tokens) and a frozen level.  With data.seq_len = 4096 both in-context levels
# fire inside every training sequence.
PAPER_PERIODS = (512, 2048, "never")


def paper_config(d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 train_tokens: int, mixer: str = "self_modifying"):
    c = base.paper_recipe(base.get_config(), train_tokens=train_tokens)
    c.model.mixer = mixer
    c.model.mlp = "cms"
    c.model.d_model = d_model
    c.model.n_layers = n_layers
    c.model.n_heads = n_heads
    c.model.d_ff = d_ff                 # width of every CMS level
    c.model.self_modifying = dict(
        path="auto",           # kernels on a TPU, XLA chunked path elsewhere
        memory="mlp",              # 2-layer residual MLP memories (NL Eq. 89/91)
        hidden_mult=1,             # memory hidden width = head_dim (project choice)
        objective="l2",
        chunk_size=64,             # k, v, q, eta, alpha memories (NL 8.2; project choice)
        memory_chunk_size=16,      # main memory (project choice; divides 4096)
        lr=1.0,
        conv_window=4,             # NL Eq. 94-97: local convolutions of window 4
        dgd=True, momentum=True, weight_decay=True,
        adaptive_k=True, adaptive_v=True, adaptive_q=False,
        adaptive_eta=True, adaptive_alpha=True,
        grad_clip=0.25,            # inner gradient clip (bounds the memory states)
    )
    c.model.cms = dict(
        periods=PAPER_PERIODS,
        variant="sequential",      # NL Eq. 73; or "independent" (Eq. 74), or "nested"
                                   # (Eq. 72, periods slowest first: (2048, 512, "never"))
        block="swiglu",
        lr=5e-7,                   # eta_scale of the in-context levels: at init the raw
                                   # chunk step is ~0.1 (512) / ~0.4 (2048 tokens) of the
                                   # max_update cap at the 340M shape (block-level
                                   # measurement, unit-RMS inputs); it grows with the
                                   # period (a sum of period gradients, Eq. 71). lr 1e-3
                                   # was 180-720x the cap: lr then changed nothing
        target="input",
        max_update=0.005,           # trust ratio of one in-context chunk step
        use_cms=True,
    )
    return c
