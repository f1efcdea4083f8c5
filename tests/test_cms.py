"""Continuum Memory System (NL Eq. 70-74) against plain loops written from Eq. 71."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory.cms import block_apply
from nl_jax.models.cms import ContinuumMemory
from nl_jax.models.layers import SwiGLU

D, F, B = 16, 24, 2


def make_cfg(**cms):
    return ml_collections.ConfigDict(dict(d_model=D, d_ff=F, dtype="float32", cms=cms))


def make_cms(seed=0, **cms):
    model = ContinuumMemory(make_cfg(**cms), rngs=nnx.Rngs(seed))
    # Non-trivial per-token learning rates: random gate weights.
    for i, level in enumerate(model.levels):
        if level.in_context:
            key = jax.random.key(100 + i)
            level.lr_proj[...] = 0.5 * jax.random.normal(key, (D,))
            level.lr_bias[...] = jnp.asarray(0.3)
    return model


def inputs(t, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, t, D))


def loop_oracle(level, x, period, reset_every=None, eps=0.0):
    """Per-token loop from Eq. 71: gradients at the chunk-start weights, summed,
    applied after the chunk's last token (scaled down per sequence and matrix to
    norm ``max_update |theta|`` if larger); outputs use the chunk-start weights.
    Nested (Eq. 72): after the update at every ``reset_every``-th token the
    initial state moves to (1 - eps) init + eps theta and theta restarts there."""
    theta = {k: jnp.broadcast_to(v, (B,) + v.shape) for k, v in level.weights().items()}
    init = theta
    acc = jax.tree.map(jnp.zeros_like, theta)
    ys = []

    def token_loss(th, x_t, eta_t):
        y = block_apply(level.block, th, x_t[:, None], jnp.float32)[:, 0]
        return jnp.sum(eta_t * jnp.sum((y - x_t) ** 2, -1)), y

    for t in range(x.shape[1]):
        x_t = x[:, t]
        eta_t = level.lr * jax.nn.sigmoid(x_t @ level.lr_proj[...] + level.lr_bias[...])
        grad, y = jax.grad(token_loss, has_aux=True)(theta, x_t, eta_t)
        ys.append(y)
        acc = jax.tree.map(jnp.add, acc, grad)
        if (t + 1) % period == 0:
            new = {}
            for name in theta:
                rows = []
                for b in range(B):
                    w, a = theta[name][b], acc[name][b]
                    limit = level.max_update * jnp.linalg.norm(w)
                    a_norm = jnp.linalg.norm(a)
                    rows.append(w - jnp.where(a_norm > limit, limit / a_norm, 1.0) * a)
                new[name] = jnp.stack(rows)
            theta = new
            acc = jax.tree.map(jnp.zeros_like, acc)
            if reset_every and (t + 1) % reset_every == 0:
                init = {k: (1 - eps) * init[k] + eps * theta[k] for k in theta}
                theta = init
    return jnp.stack(ys, 1), theta, acc


def test_large_lr_chunk_update_is_bounded_and_matches_loop():
    """A chunk step far past the stability limit: each update is cut to
    ``max_update |theta|``, so |theta| grows by at most (1 + max_update) per chunk
    and stays finite; with the bound off the same level blows up."""
    x = 3.0 * inputs(12)
    cms = make_cms(periods=(4,), lr=5.0, max_update=0.1)
    y, state = cms(x)
    ref_y, ref_theta, _ = loop_oracle(cms.levels[0], x, 4)
    np.testing.assert_allclose(y, ref_y, atol=1e-4, rtol=1e-4)
    level0 = cms.levels[0].weights()
    for name, w in state[0].theta.items():
        np.testing.assert_allclose(w, ref_theta[name], atol=1e-4, rtol=1e-4)
        grow = jnp.linalg.norm(w.reshape(B, -1), axis=-1) / jnp.linalg.norm(level0[name])
        assert bool(jnp.all(grow <= 1.1 ** 3 + 1e-4)), grow
    free = make_cms(periods=(4,), lr=5.0, max_update=0.0)
    _, free_state = free(x)
    free_norm = max(float(jnp.max(jnp.abs(w))) for w in free_state[0].theta.values())
    assert not np.isfinite(free_norm) or free_norm > 1e3 * max(
        float(jnp.max(jnp.abs(w))) for w in level0.values())


def test_never_level_is_swiglu_bitwise():
    cms = make_cms(periods=("never",))
    mlp = SwiGLU(D, F, rngs=nnx.Rngs(5))
    for name in ("gate", "up", "down"):
        getattr(cms.levels[0], name).kernel[...] = getattr(mlp, name).kernel[...]
    x = inputs(12)
    y, state = cms(x)
    ref, _ = mlp(x)
    assert state == (None,)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


@pytest.mark.parametrize("period,t", [(1, 6), (4, 10)])
def test_in_context_level_matches_eq71_loop(period, t):
    cms = make_cms(periods=(period,), lr=0.01)
    x = inputs(t)
    y, (state,) = cms(x)
    ref_y, ref_theta, ref_acc = loop_oracle(cms.levels[0], x, period)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    for k in ref_theta:
        np.testing.assert_allclose(state.theta[k], ref_theta[k], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(state.acc[k], ref_acc[k], atol=1e-5, rtol=1e-5)
    # The update really changed the weights (the test would pass vacuously otherwise).
    assert float(jnp.abs(state.theta["down"] - cms.levels[0].down.kernel[...]).max()) > 1e-4


@pytest.mark.parametrize("period,t", [(3, 7), (2, 21)])
def test_in_context_gradients_match_loop(period, t):
    """(2, 21): 10 full chunks run as 3 rematerialised groups of 3 plus a tail
    of 1, then a partial chunk."""
    cms = make_cms(periods=(period,), lr=0.01)
    x = inputs(t)
    level = cms.levels[0]
    graphdef, params = nnx.split(cms)

    def fast(params, x):
        y, _ = nnx.merge(graphdef, params)(x)
        return jnp.sum(jnp.sin(y))

    def slow(params, x):
        model = nnx.merge(graphdef, params)
        y, _, _ = loop_oracle(model.levels[0], x, period)
        return jnp.sum(jnp.sin(y))

    g_fast = jax.jit(jax.grad(fast, argnums=(0, 1)))(params, x)
    g_slow = jax.grad(slow, argnums=(0, 1))(params, x)  # eager: jit of the loop costs more
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(g_fast[0]["levels"][0]["lr_proj"][...]).max()) > 0
    del level


def test_streaming_segments_equal_one_pass():
    cms = make_cms(periods=(4, 2, "never"), lr=0.01)
    x = inputs(11)
    y, state = cms(x)
    y1, s1 = cms(x[:, :3])
    y2, s2 = cms(x[:, 3:], s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_nested_variant_matches_eq72_loop_values_and_gradients():
    """Parent period 6, child period 2: the child restarts every 6 tokens from
    an initial state that moves 30% of the way to its learned weights."""
    cms = make_cms(periods=(6, 2), variant="nested", nested_lr=0.3, lr=0.05)
    x = inputs(15)
    graphdef, params = nnx.split(cms)

    def fast(params, x):
        y, states = nnx.merge(graphdef, params)(x)
        return jnp.sum(jnp.sin(y)), (y, states)

    def slow(params, x):
        model = nnx.merge(graphdef, params)
        d1, _, _ = loop_oracle(model.levels[0], x, 6)
        d2, theta, acc = loop_oracle(model.levels[1], x + d1, 2, reset_every=6, eps=0.3)
        return jnp.sum(jnp.sin(d1 + d2)), (d1 + d2, theta, acc)

    (_, (y, states)), g_fast = jax.jit(jax.value_and_grad(fast, has_aux=True))(params, x)
    (_, (ref_y, ref_theta, ref_acc)), g_slow = jax.value_and_grad(slow, has_aux=True)(
        params, x)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    for k in ref_theta:
        np.testing.assert_allclose(states[1].theta[k], ref_theta[k], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(states[1].acc[k], ref_acc[k], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # the resets matter: the sequential chain differs
    seq = make_cms(periods=(6, 2), lr=0.05)
    nnx.update(seq, params)
    assert float(jnp.abs(seq(x)[0] - y).max()) > 1e-4


def test_nested_with_rate_one_is_the_sequential_chain():
    nested = make_cms(periods=(8, 4, "never"), variant="nested", nested_lr=1.0, lr=0.05)
    seq = make_cms(periods=(8, 4, "never"), lr=0.05)
    nnx.update(seq, nnx.state(nested))
    x = inputs(19)
    np.testing.assert_allclose(nested(x)[0], seq(x)[0], atol=1e-6, rtol=1e-6)


def test_nested_streaming_segments_equal_one_pass():
    cms = make_cms(periods=(6, 2), variant="nested", nested_lr=0.3, lr=0.05)
    x = inputs(17)
    y, state = cms(x)
    y1, s1 = cms(x[:, :5])          # segment ends inside a child chunk
    y2, s2 = cms(x[:, 5:13], s1)    # crosses the resets at 6 and 12
    y3, s3 = cms(x[:, 13:], s2)
    np.testing.assert_allclose(jnp.concatenate([y1, y2, y3], 1), y, atol=1e-5, rtol=1e-5)
    assert jax.tree.structure(s3) == jax.tree.structure(state)
    assert state[1].init is not None
    for a, b in zip(jax.tree.leaves(s3), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_nested_refuses_a_state_without_its_initial_state():
    seq = make_cms(periods=(6, 2), lr=0.05)
    nested = make_cms(periods=(6, 2), variant="nested", lr=0.05)
    _, state = seq(inputs(5))
    with pytest.raises(ConfigError, match="no 'init'"):
        nested(inputs(3), state)


def test_empty_sequence_gives_no_outputs():
    cms = make_cms(periods=(4, "never"), lr=0.05)
    y, (state, _) = cms(inputs(0))
    assert y.shape == (B, 0, D)
    assert int(state.pos) == 0


def test_zero_lr_reproduces_frozen_mlp():
    frozen = make_cms(periods=("never",))
    live = make_cms(periods=(4,), lr=0.0)
    for name in ("gate", "up", "down"):
        getattr(live.levels[0], name).kernel[...] = getattr(frozen.levels[0], name).kernel[...]
    x = inputs(12)
    y_live, (state,) = live(x)
    y_frozen, _ = frozen(x)
    np.testing.assert_allclose(y_live, y_frozen, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.theta["up"][0]),
                                  np.asarray(frozen.levels[0].up.kernel[...]))


def test_independent_variant_is_softmax_weighted_sum():
    cms = make_cms(periods=("never", "never"), variant="independent", block="mlp")
    cms.mix_logits[...] = jnp.asarray([0.3, -0.2])
    x = inputs(5)
    y, _ = cms(x)
    w = jax.nn.softmax(jnp.asarray([0.3, -0.2]))
    ref = w[0] * cms.levels[0].frozen(x) + w[1] * cms.levels[1].frozen(x)
    np.testing.assert_allclose(y, ref, atol=1e-6, rtol=1e-6)


def test_sequential_chain_sums_residual_increments():
    cms = make_cms(periods=("never", "never"))
    x = inputs(5)
    y, _ = cms(x)
    d1 = cms.levels[0].frozen(x)
    d2 = cms.levels[1].frozen(x + d1)
    np.testing.assert_allclose(y, d1 + d2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cms,key", [
    (dict(periods=(0,)), "model.cms.periods[0]"),
    (dict(periods=("sometimes",)), "model.cms.periods[0]"),
    (dict(variant="stacked"), "model.cms.variant"),
    (dict(variant="nested", periods=(2, 8)), "model.cms.periods"),
    (dict(variant="nested", periods=(6, 4)), "model.cms.periods"),
    (dict(variant="nested", nested_lr=1.5), "model.cms.nested_lr"),
    (dict(block="conv"), "model.cms.block"),
    (dict(lr=-1.0), "model.cms.lr"),
    (dict(max_update=-0.5), "model.cms.max_update"),
    (dict(colour="red"), "model.cms"),
])
def test_bad_config_raises_config_error(cms, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        ContinuumMemory(make_cfg(**cms), rngs=nnx.Rngs(0))


def test_use_cms_false_is_one_frozen_level():
    cms = make_cms(periods=(4, 8), use_cms=False)
    assert len(cms.levels) == 1 and not cms.levels[0].in_context
