"""The tiny config every baseline shares (imported by the files beside it).

A token mixer of ``nl_jax/models/baselines.py`` (its recurrence, the paper's
equation and the departures are in its docstring) with the frozen SwiGLU
channel mixer of Transformer++ tiny, at the shapes of
``nl_jax/configs/base.py`` (d_model 128, 2 layers, 4 heads).
"""

from nl_jax.configs import base


def tiny(mixer: str, memory_chunk_size: int = 64):
    c = base.get_config()
    c.model.mixer = mixer
    c.model.mlp = "swiglu"
    # The preset's own options (models/baselines.py); any other
    # model.self_modifying key may be added here to override the preset.
    c.model.self_modifying = dict(memory_chunk_size=memory_chunk_size, conv_window=4)
    return c
