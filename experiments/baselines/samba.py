"""Samba-style tiny: SSM layers alternating with sliding-window attention.

Samba (Ren et al. 2024) alternates Mamba layers with sliding-window attention
(and MLPs).  Here ``model.mixer="mamba2,attention"`` is a per-layer pattern of
the LM (``models/lm.layer_mixers``): even layers the ``mamba2`` preset of the
one engine (``models/baselines.py``), odd layers causal attention limited to
the last ``attention_window`` tokens; every layer's channel mixer is the
SwiGLU of Transformer++ tiny.  Departure from the original: Mamba-1's
per-channel selective SSM is replaced by the SSD-style scalar-decay memory of
the ``mamba2`` preset (one engine, no recurrence of its own).
"""

from nl_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.mixer = "mamba2,attention"
    c.model.mlp = "swiglu"
    c.model.attention_window = 32
    c.model.self_modifying = dict(memory_chunk_size=64, conv_window=4)
    return c
