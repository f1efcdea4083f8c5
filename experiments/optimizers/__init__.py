"""Optimizer swaps: configs that differ from the base config (``nl_jax/configs/base.py``)
only in ``levels``; the ones ``bench optimizers`` compares are defined in
``nl_jax/configs/optimizers/`` and re-exported here."""
