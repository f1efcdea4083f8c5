"""Self-modifying Titans (NL Eq. 83-93): chunked path == per-token oracle."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory.self_modifying import chunk_gate_terms, dgd_layer_chunk
from nl_jax.models.self_modifying import SelfModifyingTitans

D, H, B = 16, 2, 2


def make_cfg(**sm):
    return ml_collections.ConfigDict(dict(d_model=D, n_heads=H, dtype="float32",
                                          self_modifying=sm))


def make_pair(**sm):
    """The same parameters under the chunked and the oracle path."""
    sm.setdefault("lr", 0.9)
    fast = SelfModifyingTitans(make_cfg(path="chunked", **sm), rngs=nnx.Rngs(0))
    slow = SelfModifyingTitans(make_cfg(path="oracle", **sm), rngs=nnx.Rngs(0))
    # Strong, varied gates so the memories really move inside the sequence.
    params = nnx.state(fast, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(7), 64))

    def randomize_bias(path, leaf):
        name = jax.tree_util.keystr(path)
        if "bias" in name or "['b']" in name:
            return jax.random.uniform(next(keys), leaf.shape, minval=-1.0, maxval=1.5)
        return leaf

    pure = jax.tree_util.tree_map_with_path(randomize_bias, params.to_pure_dict())
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(fast, params)
    nnx.update(slow, params)
    return fast, slow


def inputs(t, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, t, D))


def assert_close_trees(a, b, tol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert_close(x, y, tol)


def assert_close(x, y, tol):
    """max |x - y| <= tol * max(1, max |y|): fp32 round-off scales with the values."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    scale = max(1.0, float(np.abs(y).max(initial=0.0)))
    err = float(np.abs(x - y).max(initial=0.0))
    assert err <= tol * scale, f"max abs error {err} > {tol} * {scale}"


def jitted(mixer):
    graphdef, params = nnx.split(mixer)
    run = jax.jit(lambda params, x, state=None: nnx.merge(graphdef, params)(x, state))
    return run, graphdef, params


def check_values_and_gradients(t=12, gradients=True, **sm):
    fast, slow = make_pair(**sm)
    x = inputs(t)
    graphdef, params = nnx.split(fast)
    graphdef_slow, _ = nnx.split(slow)

    def loss(gdef, params, x):
        y, state = nnx.merge(gdef, params)(x)
        return jnp.sum(jnp.sin(3.0 * y)), (y, state)

    if gradients:
        run = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    else:
        run = jax.jit(lambda gdef, p, x: (None, loss(gdef, p, x)[1]), static_argnums=0)
    g_fast, (y_fast, s_fast) = run(graphdef, params, x)
    g_slow, (y_slow, s_slow) = run(graphdef_slow, params, x)
    assert_close(y_fast, y_slow, 1e-5)
    assert_close_trees(s_fast, s_slow, 1e-5)
    # The memory moved: the main memory's state differs from its initial value.
    cur = s_fast["memory"].main.current
    init = {k: v[...] for k, v in fast.memories["memory"].items()}
    assert max(float(jnp.abs(cur[k] - init[k][None]).max()) for k in cur) > 1e-3
    if gradients:
        assert_close_trees(g_fast, g_slow, 1e-4)
        g_init = g_fast[0]["memories"]["memory"]
        assert max(float(jnp.abs(v[...]).max()) for v in jax.tree.leaves(g_init)) > 0


@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_chunked_equals_oracle(memory):
    """Values and gradients (inputs, initial memory states, all parameters)."""
    check_values_and_gradients(memory=memory, chunk_size=4, memory_chunk_size=3)


@pytest.mark.parametrize("flags", [
    dict(dgd=False, objective="dot", adaptive_q=True),
    dict(momentum=False, weight_decay=False, adaptive_k=False, adaptive_v=False,
         adaptive_eta=False),
])
def test_chunked_equals_oracle_ablations(flags):
    check_values_and_gradients(t=8, gradients=False, memory="linear", chunk_size=4,
                               memory_chunk_size=2, **flags)


def test_chunk_size_one_is_per_token_recurrence_read_before_update():
    """With C = 1 the output at t reads M_{t-1}: token t cannot change output t."""
    fast, _ = make_pair(memory="linear", chunk_size=1, memory_chunk_size=1)
    run, _, params = jitted(fast)
    x = inputs(3)
    xs = jnp.concatenate([x, x.at[:, 1].add(1.0), x.at[:, 0].add(1.0)], 0)
    y = run(params, xs)[0]
    y_a, y_b, y_c = y[:B], y[B:2 * B], y[2 * B:]
    # Changing token 1 leaves output 0 unchanged ...
    np.testing.assert_array_equal(np.asarray(y_a[:, 0]), np.asarray(y_b[:, 0]))
    # ... token 1's output changes only through the projections (q), not the
    # memory: token 0's change reaches output 1 through the memory update.
    assert float(jnp.abs(y_c[:, 1] - y_a[:, 1]).max()) > 1e-4


@pytest.mark.parametrize("window", [4, 1])
def test_streaming_segments_equal_one_pass(window):
    """Segments of 5 and 6 tokens (not multiples of the chunk sizes 4 and 3);
    window 1: a convolution that carries no tail."""
    fast, _ = make_pair(memory="mlp", chunk_size=4, memory_chunk_size=3,
                        conv_window=window)
    run, _, params = jitted(fast)
    x = inputs(11)
    y, state = run(params, x)
    y1, s1 = run(params, x[:, :5])
    y2, s2 = run(params, x[:, 5:], s1)
    assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5)
    assert_close_trees(s2, state, 1e-5)


def test_dgd_layer_chunk_matches_explicit_recurrence():
    c, din, dout = 5, 4, 3
    ks = jax.random.split(jax.random.key(3), 8)
    w0 = jax.random.normal(ks[0], (dout, din))
    s0 = jax.random.normal(ks[1], (dout, din))
    a = jax.random.normal(ks[2], (c, din))
    delta = jax.random.normal(ks[3], (c, dout))
    q = jax.random.normal(ks[4], (c, din))
    eta = jax.random.uniform(ks[5], (c,), minval=0.1, maxval=0.9)
    log_alpha = jnp.log(jax.random.uniform(ks[6], (c,), minval=0.5, maxval=1.0))
    log_beta = jnp.log(jax.random.uniform(ks[7], (c,), minval=0.5, maxval=1.0))
    terms = chunk_gate_terms(log_alpha, log_beta)
    out, w_c, s_c = dgd_layer_chunk(w0, s0, a, delta, eta, terms, q, True)
    w, s = np.asarray(w0, np.float64), np.asarray(s0, np.float64)
    a, delta, q, eta = (np.asarray(v, np.float64) for v in (a, delta, q, eta))
    alpha = np.exp(np.asarray(log_alpha, np.float64))
    beta = np.exp(np.asarray(log_beta, np.float64))
    for t in range(c):
        np.testing.assert_allclose(out[t], w @ q[t], atol=1e-5, rtol=1e-5)
        ahat = a[t] / np.sqrt(a[t] @ a[t] + 1e-6)
        s = beta[t] * s - eta[t] * np.outer(delta[t], a[t])
        w = w @ (alpha[t] * np.eye(din) - eta[t] * np.outer(ahat, ahat)) + s
    np.testing.assert_allclose(w_c, w, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s_c, s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sm,key", [
    (dict(path="fast"), "model.self_modifying.path"),
    (dict(memory="deep"), "model.self_modifying.memory"),
    (dict(chunk_size=0), "model.self_modifying.chunk_size"),
    (dict(dgd="yes"), "model.self_modifying.dgd"),
    (dict(speed=3), "model.self_modifying"),
    (dict(lr=5.0, chunk_size=8, memory_chunk_size=4), "model.self_modifying.lr=5.0 must be"),
])
def test_bad_config_raises_config_error(sm, key):
    with pytest.raises(ConfigError, match=key):
        SelfModifyingTitans(make_cfg(**sm), rngs=nnx.Rngs(0))


def test_inner_gradient_clip_matches_oracle_and_bounds_states():
    """Adversarial inputs (x 30, lr 1): the per-token inner gradients are clipped
    to Frobenius norm G and each chunk's step is eta / C, so every memory's state
    moves by at most T^2 * lr * G / C in Frobenius norm over T tokens (the DGD
    factor is a contraction; |S_t| <= t lr G / C).  Chunked == oracle with the
    clip active."""
    t, c, clip = 16, 4, 0.05
    x = 30.0 * inputs(t)
    fast, slow = make_pair(memory="mlp", chunk_size=c, memory_chunk_size=c, lr=1.0,
                           grad_clip=clip)
    y_fast, s_fast = jitted(fast)[0](nnx.split(fast)[1], x)
    y_slow, s_slow = jitted(slow)[0](nnx.split(slow)[1], x)
    assert_close(y_fast, y_slow, 1e-5)
    assert_close_trees(s_fast, s_slow, 1e-5)
    unclipped, _ = make_pair(memory="mlp", chunk_size=c, memory_chunk_size=c, lr=1.0,
                             grad_clip=0.0)
    y_free, _ = jitted(unclipped)[0](nnx.split(unclipped)[1], x)
    assert float(jnp.abs(y_free - y_fast).max()) > 1e-4      # the clip is active
    cur = s_fast["memory"].main.current
    init = {k: v[...] for k, v in fast.memories["memory"].items()}

    def frob(w):
        return jnp.sqrt(jnp.sum(w ** 2, axis=(-2, -1)))

    for k in cur:
        assert bool(jnp.all(jnp.isfinite(cur[k])))
        assert bool(jnp.all(frob(cur[k]) <= frob(init[k])[None] + t * t * clip / c + 1e-5))


def test_bad_grad_clip_raises_config_error():
    with pytest.raises(ConfigError, match=r"model\.self_modifying\.grad_clip"):
        SelfModifyingTitans(make_cfg(grad_clip=-1.0), rngs=nnx.Rngs(0))
