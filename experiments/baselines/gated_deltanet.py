"""Gated DeltaNet tiny config (experiments/baselines/common.py).

Reads in chunks of 64 tokens; outputs do not depend on the chunk.
"""

from experiments.baselines import common


def get_config():
    return common.tiny("gated_deltanet")
