"""Blocked causal attention (``models/attention.py``) against the plain T x T form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.models.attention import blocked_causal_attention, causal_attention

B, H, D = 2, 3, 8


def qkv(t: int):
    ks = jax.random.split(jax.random.PRNGKey(t), 4)
    q, k, v = (jax.random.normal(key, (B, t, H, D)) for key in ks[:3])
    return q, k, v, jax.random.normal(ks[3], (B, t, H, D))


@pytest.mark.parametrize("t, block, window", [(40, 16, 0), (40, 16, 5), (48, 16, 20)])
def test_blocked_matches_plain_values_and_gradients(t, block, window):
    """Same outputs and gradients, with and without a window (shorter than, and
    longer than, a block), T not a multiple of the block."""
    q, k, v, weights = qkv(t)

    def loss(attend):
        return lambda q, k, v: jnp.sum(weights * attend(q, k, v))

    def blocked(q, k, v):
        return blocked_causal_attention(q, k, v, window=window, block=block)

    def plain(q, k, v):
        return causal_attention(q, k, v, window=window)

    def values_and_grads(attend):
        return jax.jit(lambda q, k, v: (attend(q, k, v), jax.grad(
            loss(attend), argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    (got_y, got), (want_y, want) = values_and_grads(blocked), values_and_grads(plain)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6)
    for g, w, name in zip(got, want, "qkv", strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def _shapes(jaxpr):
    """Every intermediate shape of a jaxpr, sub-jaxprs (checkpointed blocks) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield getattr(var.aval, "shape", ())
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _shapes(inner)


def test_blocked_keeps_no_t_by_t_scores_forward_or_backward():
    t, block = 64, 16
    q, k, v, _ = qkv(t)

    def loss(q, k, v):
        return jnp.sum(blocked_causal_attention(q, k, v, block=block))

    shapes = list(_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
    assert (B, H, block, t) in shapes          # the last block's scores
    assert not [s for s in shapes if len(s) >= 2 and s[-2:] == (t, t)]
    plain = jax.make_jaxpr(lambda q, k, v: causal_attention(q, k, v))(q, k, v).jaxpr
    assert (B, H, t, t) in list(_shapes(plain))   # what the check would catch


def test_block_size_grows_to_bound_the_unrolled_blocks():
    from nl_jax.models import attention
    assert attention.query_block_size(100) == attention.QUERY_BLOCK
    big = attention.QUERY_BLOCK * attention.MAX_QUERY_BLOCKS * 4
    assert -(-big // attention.query_block_size(big)) <= attention.MAX_QUERY_BLOCKS
