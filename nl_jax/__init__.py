"""nl_jax: Nested Learning (Hope, Titans, CMS) in JAX/Flax."""

__version__ = "0.1.0"
