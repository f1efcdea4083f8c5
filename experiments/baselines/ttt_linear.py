"""TTT-Linear tiny config (experiments/baselines/common.py).

The chunk is TTT's mini-batch b = 16 (it changes outputs: every gradient of a
mini-batch is taken at its start weights).
"""

from experiments.baselines import common


def get_config():
    return common.tiny("ttt_linear", memory_chunk_size=16)
