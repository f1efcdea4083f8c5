"""Hope-Attention tiny: softmax attention followed by CMS (NL section 8).

The Transformer++ tiny (experiments/transformer/tiny.py) with its SwiGLU
replaced by the CMS of experiments/hope/tiny.py: a level updated in context
every 32 tokens and a frozen level (d_ff 384 each).
"""

from nl_jax.configs.hope import tiny


def get_config():
    c = tiny.get_config()
    c.model.mixer = "attention"
    del c.model["self_modifying"]
    return c
