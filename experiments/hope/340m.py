"""Hope at 340M (NL / Titans Table 1 scale, 15B tokens).

Shape: d_model 1024 x 24 layers x 16 heads (head_dim 64), the Transformer++
340M shape of the Titans/GDN baselines.  Each of the three CMS levels
(periods 512, 2048, never) is a SwiGLU of width d_ff; d_ff = 1024 puts the
total at ~340M with the self-modifying memories (count_params.py).
"""

from experiments.hope import common


def get_config():
    return common.paper_config(d_model=1024, n_layers=24, n_heads=16, d_ff=1024,
                               train_tokens=15_000_000_000)
