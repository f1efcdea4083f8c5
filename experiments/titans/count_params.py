"""Parameter counts of the Titans configs for every Titans mixer (nnx.eval_shape).

    python -m experiments.titans.count_params
"""

import os

from experiments.count_params import describe, load

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("tiny.py", "340m.py", "760m.py")
MIXERS = ("titans_lmm", "titans_mag", "titans_mac", "titans_mal")


def main() -> None:
    for name in CONFIGS:
        cfg = load(os.path.join(HERE, name))
        for mixer in MIXERS:
            cfg.model.mixer = mixer
            print(describe(name, cfg.model))


if __name__ == "__main__":
    main()
