"""Where the packages come from; metadata, pinned dependencies and package data
live in setup.cfg.

The Pallas kernels stay in the repository's top-level ``kernels/`` folder (the
layout the product card asks for) but install as the package ``nl_jax_kernels``:
a top-level package named ``kernels`` would collide with the unrelated
``kernels`` project on PyPI (installing one would overwrite the other's files,
and whichever comes first on ``sys.path`` would shadow the other).  The library
imports them only as ``nl_jax_kernels`` (an editable install maps that name to
``kernels/``, as ``make install`` does).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["nl_jax", "nl_jax.*"]) + ["nl_jax_kernels"],
    package_dir={"nl_jax_kernels": "kernels"},
)
