"""TTT-Linear tiny: a baseline of the papers, a preset of the one engine.

The token mixer ``ttt_linear``
(``nl_jax/models/baselines.py``: its recurrence, the paper's equation and the
departures) with the frozen SwiGLU channel mixer of Transformer++ tiny, at the
shapes of ``nl_jax/configs/base.py`` (d_model 128, 2 layers, 4 heads).  The
chunk is TTT's mini-batch b = 16 (it changes outputs: every gradient of a
mini-batch is taken at its start weights).
"""

from nl_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.mixer = "ttt_linear"
    c.model.mlp = "swiglu"
    # The preset's own options (models/baselines.py); any other
    # model.self_modifying key may be added here to override the preset.
    c.model.self_modifying = dict(memory_chunk_size=16, conv_window=4)
    return c
