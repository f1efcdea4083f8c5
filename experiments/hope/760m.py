"""Hope at 760M (NL Table 2, 30B tokens).

Shape: d_model 1536 x 24 layers x 16 heads (head_dim 96), the Transformer++
760M shape of the Titans/GDN baselines.  Each of the three CMS levels is a
SwiGLU of width d_ff, chosen so the total is ~760M (count_params.py).
"""

from experiments.hope import common


def get_config():
    return common.paper_config(d_model=1536, n_layers=24, n_heads=16, d_ff=1536,
                               train_tokens=30_000_000_000)
