"""DeltaNet (the delta rule) tiny config (experiments/baselines/common.py).

Reads in chunks of 64 tokens; outputs do not depend on the chunk (the exact
per-token delta rule in its WY form).
"""

from experiments.baselines import common


def get_config():
    return common.tiny("deltanet")
