"""Optimizer swaps: configs that differ from ``experiments/base.py`` only in ``levels``."""
