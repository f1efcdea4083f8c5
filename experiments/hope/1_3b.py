"""Hope at 1.3B (NL Table 2, 100B tokens).

Shape: d_model 2048 x 24 layers x 16 heads (head_dim 128), the Transformer++
1.3B shape of the GDN/Titans baselines.  Each of the three CMS levels is a
SwiGLU of width d_ff, chosen so the total is ~1.3B (count_params.py).
"""

from experiments.hope import common


def get_config():
    return common.paper_config(d_model=2048, n_layers=24, n_heads=16, d_ff=2048,
                               train_tokens=100_000_000_000)
