"""The config files that ship with the library.

``base.py`` holds every key a config may set (``nl_jax.config.check_known_keys``
checks against it); the three tiny configs are the default run
(``hope/tiny.py``, what ``python -m nl_jax train`` trains without ``--config``)
and the models of ``bench throughput``; ``optimizers/`` holds the level swaps
that ``bench optimizers`` and ``bench schedules`` compare.  They live inside
the package so that an installed nl_jax finds them; the repository's
``experiments/`` folder holds the larger configs, which import their base from
here (``from nl_jax.configs import base``), and re-exports these files under
their old paths.

Each file is an ordinary config file: ``--config`` takes its path, e.g.
``--config nl_jax/configs/titans/tiny.py``.
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The absolute path of the bundled config file ``name`` (e.g. ``"hope/tiny.py"``)."""
    return os.path.join(DIR, *name.split("/"))
