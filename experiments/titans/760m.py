"""Titans (MAG) at the paper's 760M scale (Titans Table 1 / NL Table 2, 30B tokens).

Shape: d_model 1536 x 24 layers x 16 heads (head_dim 96), the Transformer++
760M shape of the Titans/GDN baselines.  d_ff is reduced from
Transformer++'s 4096 to 2560 so that the memory projections fit the ~760M budget;
run ``python -m experiments.titans.count_params`` for the exact counts.
"""

from experiments.titans import common


def get_config():
    return common.paper_config(d_model=1536, n_layers=24, n_heads=16, d_ff=2560,
                               mixer="titans_mag")
