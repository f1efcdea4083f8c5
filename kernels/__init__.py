"""Pallas kernels of nl_jax.  This folder installs as the package ``nl_jax_kernels``
(setup.py: a top-level ``kernels`` would collide with an unrelated PyPI project);
import it by that name: ``from nl_jax_kernels import linear_memory``."""
