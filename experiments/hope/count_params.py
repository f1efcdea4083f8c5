"""Parameter counts of every Hope config without allocating it (nnx.eval_shape).

    python -m experiments.hope.count_params
"""

import os

from experiments.count_params import describe, load

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("tiny.py", "attention.py", "340m.py", "760m.py", "1_3b.py")


def main() -> None:
    for name in CONFIGS:
        cfg = load(os.path.join(HERE, name))
        print(f"{describe(name, cfg.model)}  cms periods={tuple(cfg.model.cms.periods)}")


if __name__ == "__main__":
    main()
