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
# parameters and training tokens (NL / Titans section 5.1)
PAPER_SIZES = {"340m.py": (340e6, 15e9), "760m.py": (760e6, 30e9), "1_3b.py": (1.3e9, 100e9)}


def test_the_config_list_is_not_empty():
    assert "experiments/hope/tiny.py" in CONFIG_FILES
    assert "experiments/titans/760m.py" in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_loads_validates_and_builds(path):
    cfg = load(os.path.join(REPO, path))
    nl_config.validate(cfg, device_count=1 if "tiny" in path else None)
    n = count(cfg.model)
    if os.path.basename(path) not in PAPER_SIZES:
        assert n > 0
        return
    params, tokens = PAPER_SIZES[os.path.basename(path)]
    assert abs(n - params) / params < 0.05, f"{path}: {n / 1e6:.1f}M parameters"
    assert cfg.data.seq_len == 4096 and cfg.data.batch_size == 128
    assert 0 <= tokens - cfg.train.steps * 128 * 4096 < 128 * 4096
