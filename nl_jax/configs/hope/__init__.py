"""Hope tiny (the default run of ``python -m nl_jax train``)."""
