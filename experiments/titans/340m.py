"""Titans (MAG) at the paper's 340M scale (Titans Table 1, 15B tokens).

Shape: d_model 1024 x 24 layers x 16 heads (head_dim 64), the Transformer++
340M shape of the Titans/GDN baselines (Titans section 5.1 follows Yang et al.,
GDN).  d_ff is reduced from Transformer++'s 2816 to 1536 so that the memory
projections (q, k, v, gates, initial memory weights) fit the same ~340M budget;
run ``python -m experiments.titans.count_params`` for the exact counts.
"""

from experiments.titans import common


def get_config():
    c = common.paper_config(d_model=1024, n_layers=24, n_heads=16, d_ff=1536,
                            mixer="titans_mag")
    c.train.steps = 15_000_000_000 // (128 * 4096)   # 15B tokens at 340M (Titans 5.1)
    return c
