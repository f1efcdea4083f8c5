"""Hope tiny: the CPU config (self-modifying Titans + CMS).

d_model 128 x 2 layers x 4 heads (head_dim 32), seq 128, batch 16 (base.py).
Memory chunks: 32 tokens for the k/v/eta/alpha memories, 16 for the main
memory.  CMS: a SwiGLU level updated in context every 32 tokens and a frozen
SwiGLU level, each of width d_ff = 384 (base.py).
"""

from nl_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.mixer = "self_modifying"
    c.model.mlp = "cms"
    c.model.self_modifying = dict(
        path="auto", memory="mlp", hidden_mult=1, objective="l2",  # auto: kernels on a TPU
        chunk_size=32, memory_chunk_size=16, lr=1.0, conv_window=4,
        dgd=True, momentum=True, weight_decay=True,
        adaptive_k=True, adaptive_v=True, adaptive_q=False,
        adaptive_eta=True, adaptive_alpha=True,
        grad_clip=0.25,            # inner gradient clip (bounds the memory states)
    )
    c.model.cms = dict(periods=(32, "never"), variant="sequential", block="swiglu",
                       # lr: the raw chunk step is ~0.2-0.4 of the trust-ratio cap
                       # (median, init to 60 steps), so lr sets the step and the cap
                       # (max_update) only catches outliers; lr 1e-3 hit the cap on
                       # every chunk (6-30x) and lr then changed nothing
                       lr=1e-5, target="input", use_cms=True,
                       max_update=0.005)
    return c
