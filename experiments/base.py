"""The base config moved to ``nl_jax/configs/base.py`` (so that an installed nl_jax
has it); this module re-exports it for config files that still do
``from experiments import base``.  New config files: ``from nl_jax.configs import base``.
"""

from nl_jax.configs.base import get_config, paper_recipe

__all__ = ["get_config", "paper_recipe"]
