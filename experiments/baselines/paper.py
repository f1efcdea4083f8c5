"""The baselines at the papers' scales: ``--config experiments/baselines/paper.py:MIXER,SIZE``.

MIXER: linear_attention, mamba2, deltanet, gated_deltanet, ttt_linear, or
samba (``mamba2,attention`` with a 2,048-token window); SIZE: 340m or 760m.
Shapes of the Titans paper's baselines (Titans section 5.1, after Yang et
al.'s Gated DeltaNet): 340M = d_model 1024 x 24 layers x 16 heads, 760M =
d_model 1536 x 24 x 16 heads, with Transformer++'s SwiGLU (d_ff 2816 / 4096)
as the channel mixer; the training recipe of ``nl_jax/configs/base.paper_recipe``
(Llama-2 tokenizer, not bundled: pass --config.data.tokenizer.path; 4K
tokens, 0.5M-token batches; 15B / 30B tokens).  Counts:
``python -m nl_jax levels --config experiments/baselines/paper.py:deltanet,340m``.
"""

from nl_jax.configs import base

SHAPES = {"340m": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, tokens=15e9),
          "760m": dict(d_model=1536, n_layers=24, n_heads=16, d_ff=4096, tokens=30e9)}
MIXERS = {"linear_attention": "linear_attention", "mamba2": "mamba2",
          "deltanet": "deltanet", "gated_deltanet": "gated_deltanet",
          "ttt_linear": "ttt_linear", "samba": "mamba2,attention"}


def get_config(arg: str):
    mixer, _, size = arg.partition(",")
    if mixer not in MIXERS or size not in SHAPES:
        raise ValueError(f"experiments/baselines/paper.py:{arg}: give MIXER,SIZE with MIXER "
                         f"one of {sorted(MIXERS)} and SIZE one of {sorted(SHAPES)}, "
                         f"e.g. paper.py:gated_deltanet,340m")
    shape = dict(SHAPES[size])
    tokens = shape.pop("tokens")
    c = base.get_config()
    c.model.update(shape)
    c.model.mixer = MIXERS[mixer]
    c.model.mlp = "swiglu"
    c.model.self_modifying = dict(memory_chunk_size=16 if mixer == "ttt_linear" else 64,
                                  conv_window=4)
    if mixer == "samba":
        c.model.attention_window = 2048
    base.paper_recipe(c, train_tokens=int(tokens))
    return c
