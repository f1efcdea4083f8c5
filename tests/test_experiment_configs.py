"""Every config file in experiments/ loads, validates and builds its model; the
paper-scale configs have the parameter count their name promises (within 5%)."""

import glob
import os

import pytest

from experiments.count_params import count, load
from nl_jax import config as nl_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = {"__init__.py", "common.py", "count_params.py", "base.py"}
CONFIG_FILES = sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "experiments", "**", "*.py"),
                                                recursive=True)
    if os.path.basename(p) not in HELPERS)
# A config that takes an argument appears once per argument ("path.py:arg").
CONFIG_FILES = [p for p in CONFIG_FILES if p != "experiments/baselines/paper.py"] + [
    f"experiments/baselines/paper.py:{m},{s}" for m in ("gated_deltanet", "samba", "ttt_linear")
    for s in ("340m", "760m")]
# parameters and training tokens (NL / Titans section 5.1)
PAPER_SIZES = {"340m.py": (340e6, 15e9), "760m.py": (760e6, 30e9), "1_3b.py": (1.3e9, 100e9)}
# The baselines at the papers' shapes (Transformer++'s with another mixer): within 10%.
PAPER_ARGS = {"340m": (340e6, 15e9), "760m": (760e6, 30e9)}


def test_the_config_list_is_not_empty():
    assert "experiments/hope/tiny.py" in CONFIG_FILES
    assert "experiments/titans/760m.py" in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_loads_validates_and_builds(path):
    file, _, arg = path.partition(":")
    cfg = nl_config.load_config_file(path) if arg else load(os.path.join(REPO, file))
    nl_config.validate(cfg, device_count=1 if "tiny" in path else None)
    n = count(cfg.model)
    size = arg.rpartition(",")[2]
    if os.path.basename(file) not in PAPER_SIZES and size not in PAPER_ARGS:
        assert n > 0
        return
    params, tokens = PAPER_SIZES.get(os.path.basename(file)) or PAPER_ARGS[size]
    tolerance = 0.10 if arg else 0.05
    assert abs(n - params) / params < tolerance, f"{path}: {n / 1e6:.1f}M parameters"
    assert cfg.data.seq_len == 4096 and cfg.data.batch_size == 128
    assert 0 <= tokens - cfg.train.steps * 128 * 4096 < 128 * 4096
