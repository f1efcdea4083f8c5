"""Long sequences with extreme gates stay finite; bad specs raise ConfigError."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.errors import ConfigError
from nl_jax.memory import MemorySpec, apply_memory, init_memory_params
from nl_jax.memory.gates import segsum
from nl_jax.memory.linear_chunked import gate_products
from tests.memory_helpers import perturbed, random_inputs


def test_segsum_is_the_segment_sum():
    x = jnp.array([0.5, -1.0, 2.0, 0.25])
    s = np.asarray(segsum(x))
    for i in range(4):
        for j in range(4):
            expected = float(np.sum(np.asarray(x)[j + 1:i + 1])) if i >= j else -np.inf
            assert s[i, j] == pytest.approx(expected)


def test_gate_products_match_float64_products_with_extreme_gates():
    """Split-prefix-sum gate products against direct float64 products: exactly
    1 on the diagonal, 0 above, O(1) products to 1e-6 relative even after 1e-7
    gates in the chunk (a plain fp32 prefix-sum difference errs by ~1e-3)."""
    c = 64
    rng = np.random.default_rng(0)
    gates = np.where(rng.random((3, c)) < 0.5, 1e-7, 1.0 - 1e-3 * rng.random((3, c)))
    gates[1] = rng.uniform(0.5, 1.0, c)                  # ordinary gates
    gates[2, : c // 2], gates[2, c // 2:] = 1e-7, 0.999  # tiny gates, then ~1
    got = np.asarray(gate_products(jnp.log(jnp.asarray(gates, jnp.float32))), np.float64)
    for row in range(3):
        want = np.zeros((c, c))
        for i in range(c):
            for j in range(i + 1):
                want[i, j] = np.prod(gates[row, j + 1:i + 1])
        np.testing.assert_array_equal(np.diag(got[row]), 1.0)
        assert np.all(got[row][np.triu_indices(c, 1)] == 0.0)
        # O(1) products: to fp32 accuracy; tiny ones (many 1e-7 factors, each
        # log rounded to fp32): ~1e-6 per factor
        big, tiny = want > 1e-3, (want > 1e-30) & (want <= 1e-3)
        np.testing.assert_allclose(got[row][big], want[big], rtol=1e-6)
        np.testing.assert_allclose(got[row][tiny], want[tiny], rtol=2e-5)
    # in the worst row the tail pairs are O(1) products after |cs| ~ 500
    assert want[c - 1, c - 2] > 0.99


def test_gate_products_gradient_is_exact_for_tiny_gates():
    """d/dx_l sum w_ij P_ij = sum over segments containing l of w_ij P_ij / x_l,
    in float64, against the custom backward, with gates down to 1e-9."""
    c = 16
    rng = np.random.default_rng(1)
    x = rng.uniform(0.3, 1.0, c)
    x[[3, 8, 12]] = 1e-6, 1e-9, 1e-4
    w = rng.normal(size=(c, c))
    grad = np.asarray(jax.grad(lambda lx: jnp.sum(jnp.asarray(w, jnp.float32) * gate_products(
        lx)))(jnp.log(jnp.asarray(x, jnp.float32))), np.float64) / x   # d/dx = d/dlog x / x
    want = np.zeros(c)
    for i in range(c):
        for j in range(i):
            prod = np.prod(x[j + 1:i + 1])
            for m in range(j + 1, i + 1):
                want[m] += w[i, j] * prod / x[m]
    np.testing.assert_allclose(grad, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())


def test_chunked_gate_gradients_match_oracle_for_tiny_and_zero_gates():
    """eta down to 1e-9 and 0, alpha = 1 exactly (fp32 sigmoid of a logit ~17):
    the fast path floors log gates at -80 and stays finite and equal to the
    oracle, values and gradients w.r.t. the gates.  At a gate of exactly 0 its
    own gradient is 0 (through a sigmoid it is 0 there anyway)."""
    b, t, h, d, c = 1, 32, 1, 4, 16
    q, k, v, theta, eta, alpha = random_inputs(0, b, t, h, d, d)
    eta = eta.at[0, 8, 0].set(1e-9).at[0, 20, 0].set(1e-6).at[0, 27, 0].set(0.0)
    alpha = alpha.at[0, 5, 0].set(1.0).at[0, 22, 0].set(1.0 - 1e-6)
    wy = jax.random.normal(jax.random.PRNGKey(3), v.shape)
    results = []
    for path in ("oracle", "chunked"):
        spec = MemorySpec(chunk_size=c, path=path, remat_every=1)
        params = perturbed(init_memory_params(spec, jax.random.PRNGKey(1), h, d, d), 2)

        def loss(eta, alpha, spec=spec, params=params):
            y = apply_memory(spec, params, q, k, v, theta, eta, alpha)[0]
            return jnp.sum(wy * y), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(eta, alpha)
        results.append((y, grads))
    (y_o, (ge_o, ga_o)), (y_c, (ge_c, ga_c)) = results
    np.testing.assert_allclose(y_c, y_o, atol=1e-5)
    for got, want, zero_gate in ((ge_c, ge_o, 27), (ga_c, ga_o, 5)):
        got, want = np.asarray(got).copy(), np.asarray(want).copy()
        assert np.all(np.isfinite(got)) and got[0, zero_gate, 0] == 0.0
        got[0, zero_gate, 0] = want[0, zero_gate, 0] = 0.0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    # the tiny gates' own gradients, to 1e-3 relative
    for idx in (8, 20):
        assert abs(float(ge_c[0, idx, 0] / ge_o[0, idx, 0]) - 1) < 1e-3


def test_empty_segment_returns_no_outputs_and_the_same_state():
    q, k, v, theta, eta, alpha = random_inputs(0, 2, 0, 2, 4, 4)
    for path in ("oracle", "chunked"):
        spec = MemorySpec(chunk_size=4, path=path)
        params = init_memory_params(spec, jax.random.PRNGKey(1), 2, 4, 4)
        y, state = apply_memory(spec, params, q, k, v, theta, eta, alpha)
        assert y.shape == (2, 0, 2, 4)
        np.testing.assert_array_equal(state.params["w0"][0], params["w0"])


def test_long_sequence_extreme_gates_finite():
    t, d = 16384, 4
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    k = jax.random.normal(keys[0], (1, t, 1, d))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    q = jax.random.normal(keys[1], (1, t, 1, d))
    v = jax.random.normal(keys[2], (1, t, 1, d))

    def extreme(key, lo, hi):
        # runs of gates near 0 and near 1 (products over a chunk under- or overflow)
        pick = jax.random.bernoulli(key, 0.5, (1, t // 256, 1))
        return jnp.repeat(jnp.where(pick, hi, lo), 256, axis=1)

    # theta stays small: with eta ~ 1 and alpha ~ 0 the undamped momentum makes
    # the true dynamics grow (both paths agree on that); gates are what is tested.
    theta = extreme(keys[3], 1e-6, 1e-3)
    eta = extreme(keys[4], 1e-6, 1.0 - 1e-6)
    alpha = extreme(keys[5], 1e-6, 1.0 - 1e-6)
    spec = MemorySpec(chunk_size=64)
    params = init_memory_params(spec, jax.random.PRNGKey(1), 1, d, d)

    def loss(q, k, v, theta, eta, alpha):
        y, state = apply_memory(spec, params, q, k, v, theta, eta, alpha)
        return jnp.sum(y * v), (y, state)

    (_, (y, state)), grads = jax.jit(jax.value_and_grad(loss, range(6), has_aux=True))(
        q, k, v, theta, eta, alpha)
    assert np.all(np.isfinite(np.asarray(y)))
    assert np.abs(np.asarray(y)).max() > 1e-2
    for leaf in jax.tree.leaves((state, grads)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    oracle = MemorySpec(chunk_size=64, path="oracle")
    y_oracle, _ = jax.jit(lambda *a: apply_memory(oracle, params, *a))(
        q, k, v, theta, eta, alpha)
    scale = float(np.abs(np.asarray(y_oracle)).max())
    np.testing.assert_allclose(y, y_oracle, atol=1e-4 * scale)


@pytest.mark.parametrize("field,value", [
    ("kind", "conv"), ("objective", "l1"), ("path", "fast"), ("path", "pallas"),
    ("chunk_size", 0), ("remat_every", 0), ("mlp_depth", 0), ("mlp_expansion", 1.5),
    ("momentum", 1), ("dgd", "yes"),
])
def test_bad_spec_raises_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        MemorySpec(**{field: value})


def test_bad_shapes_raise_config_error():
    spec = MemorySpec(kind="mlp")
    with pytest.raises(ConfigError, match="d_k == d_v"):
        init_memory_params(spec, jax.random.PRNGKey(0), 2, 4, 8)
    params = init_memory_params(MemorySpec(), jax.random.PRNGKey(0), 2, 4, 4)
    x = jnp.zeros((1, 8, 2, 4))
    gate = jnp.zeros((1, 8, 2))
    with pytest.raises(ConfigError, match="gate eta"):
        apply_memory(MemorySpec(), params, x, x, x, gate, gate[:, :4], gate)
    with pytest.raises(ConfigError, match="q and k"):
        apply_memory(MemorySpec(), params, x, x[..., :3], x, gate, gate, gate)
