"""Shared random inputs for the memory tests (helpers only, no tests here)."""

import jax
import jax.numpy as jnp


def random_inputs(seed, b, t, h, d_k, d_v, theta_max=0.1):
    """q, k (unit norm), v and gates theta, eta, alpha in (0, 1)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, h, d_k))
    k = jax.random.normal(ks[1], (b, t, h, d_k))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, d_v))
    theta = jax.random.uniform(ks[3], (b, t, h), minval=0.01, maxval=theta_max)
    eta = jax.random.uniform(ks[4], (b, t, h), minval=0.05, maxval=0.99)
    alpha = jax.random.uniform(ks[5], (b, t, h), minval=0.001, maxval=0.3)
    return q, k, v, theta, eta, alpha


def perturbed(params, seed, scale=0.2):
    """params plus small random noise (so that no test starts from zero weights)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(kk, x.shape)
                                     for x, kk in zip(leaves, keys, strict=True)])
