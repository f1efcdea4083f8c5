"""Optimizer swaps: configs that differ from ``nl_jax/configs/base.py`` only in ``levels``."""
