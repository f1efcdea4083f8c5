"""C = 1 equals a hand-written per-token loop of Titans Eq. 13-14 (and NL Eq. 57)."""

import jax
import numpy as np
import pytest

from nl_jax.memory import MemorySpec, apply_memory, init_memory_params
from tests.memory_helpers import perturbed, random_inputs

T, D = 13, 6


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _silu_grad(x):
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def _linear_loop(m0, q, k, v, theta, eta, alpha, dgd):
    """Titans Eq. 13-14 for M k with l = ||M k - v||^2; DGD adds M k k^T (NL Eq. 57)."""
    m = m0.astype(np.float64)
    s = np.zeros_like(m)
    ys = []
    for t in range(len(q)):
        grad = 2.0 * np.outer(m @ k[t] - v[t], k[t])
        if dgd:
            grad = grad + m @ np.outer(k[t], k[t])
        s = eta[t] * s - theta[t] * grad
        m = (1.0 - alpha[t]) * m + s
        ys.append(m @ q[t])
    return np.stack(ys), m, s


def _mlp_loop(w0, w1, q, k, v, theta, eta, alpha, dgd):
    """Same rule for M(x) = x + W1 silu(W0 x), gradients by hand."""
    w0, w1 = w0.astype(np.float64), w1.astype(np.float64)
    s0, s1 = np.zeros_like(w0), np.zeros_like(w1)
    ys = []
    for t in range(len(q)):
        pre = w0 @ k[t]
        hid = _silu(pre)
        err = 2.0 * (k[t] + w1 @ hid - v[t])
        g1 = np.outer(err, hid)
        g0 = np.outer((w1.T @ err) * _silu_grad(pre), k[t])
        if dgd:
            g1 = g1 + np.outer(w1 @ hid, hid)
            g0 = g0 + np.outer(pre, k[t])
        s0 = eta[t] * s0 - theta[t] * g0
        s1 = eta[t] * s1 - theta[t] * g1
        w0 = (1.0 - alpha[t]) * w0 + s0
        w1 = (1.0 - alpha[t]) * w1 + s1
        ys.append(q[t] + w1 @ _silu(w0 @ q[t]))
    return np.stack(ys), (w0, w1), (s0, s1)


@pytest.mark.parametrize("kind,dgd", [("linear", False), ("linear", True), ("mlp", True)])
def test_per_token_rule_matches_hand_loop(kind, dgd):
    q, k, v, theta, eta, alpha = (np.asarray(x) for x in random_inputs(3, 1, T, 1, D, D))
    spec = MemorySpec(kind=kind, dgd=dgd, chunk_size=1, mlp_depth=2, mlp_expansion=2)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(0), 1, D, D), 4, 0.3)
    sl = (0, slice(None), 0)
    args = (q[sl], k[sl], v[sl], theta[sl], eta[sl], alpha[sl])
    if kind == "linear":
        y_ref, w_ref, s_ref = _linear_loop(np.asarray(params["w0"][0]), *args, dgd)
        w_ref, s_ref = (w_ref,), (s_ref,)
    else:
        y_ref, w_ref, s_ref = _mlp_loop(np.asarray(params["w0"][0]),
                                        np.asarray(params["w1"][0]), *args, dgd)
    for path in ("oracle", "chunked"):
        spec_p = MemorySpec(kind=kind, dgd=dgd, chunk_size=1, path=path)
        y, state = jax.jit(apply_memory, static_argnums=0)(spec_p, params, q, k, v, theta,
                                                           eta, alpha)
        np.testing.assert_allclose(np.asarray(y)[0, :, 0], y_ref, atol=1e-5, rtol=1e-5,
                                   err_msg=path)
        for i, (w, s) in enumerate(zip(w_ref, s_ref, strict=True)):
            np.testing.assert_allclose(state.params[f"w{i}"][0, 0], w, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(state.momentum[f"w{i}"][0, 0], s, atol=1e-5,
                                       rtol=1e-5)


def test_delta_rule_special_case():
    """No momentum, no decay, DGD: W <- W (I - theta k k^T) - theta grad (NL Eq. 57)."""
    q, k, v, theta, eta, alpha = (np.asarray(x) for x in random_inputs(5, 1, T, 1, D, D))
    spec = MemorySpec(momentum=False, weight_decay=False, dgd=True, chunk_size=1)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(0), 1, D, D), 4, 0.3)
    w = np.asarray(params["w0"][0], np.float64)
    ys = []
    for t in range(T):
        kt, th = k[0, t, 0], theta[0, t, 0]
        grad = 2.0 * np.outer(w @ kt - v[0, t, 0], kt)
        w = w @ (np.eye(D) - th * np.outer(kt, kt)) - th * grad
        ys.append(w @ q[0, t, 0])
    y, state = jax.jit(apply_memory, static_argnums=0)(spec, params, q, k, v, theta, eta,
                                                       alpha)
    np.testing.assert_allclose(np.asarray(y)[0, :, 0], np.stack(ys), atol=1e-5)
    np.testing.assert_allclose(state.params["w0"][0, 0], w, atol=1e-5)
    assert np.all(np.asarray(state.momentum["w0"]) == 0.0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("path", ["oracle", "chunked"])
def test_grad_clip_bounds_every_token_step(kind, path):
    """No momentum, no decay, C = 1: M_t - M_{t-1} = -theta_t u_t, so with
    grad_clip = G every layer moves by at most theta_t G, and by exactly that
    for tokens whose raw direction is longer than G."""
    g = 0.5
    spec = MemorySpec(kind=kind, momentum=False, weight_decay=False, chunk_size=1,
                      path=path, grad_clip=g)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(3), 1, D, D), 4, 0.5)
    q, k, v, theta, eta, alpha = random_inputs(5, 1, T, 1, D, D, theta_max=0.5)
    state, steps = None, []
    for t in range(T):
        sl = slice(t, t + 1)
        _, new = apply_memory(spec, params, q[:, sl], k[:, sl], 3.0 * v[:, sl],
                              theta[:, sl], eta[:, sl], alpha[:, sl], state)
        if state is not None:
            steps.append([float(np.linalg.norm(np.asarray(a - b)))
                          for a, b in zip(jax.tree.leaves(new.params),
                                          jax.tree.leaves(state.params), strict=True)])
        state = new
    bound = np.asarray(theta[0, 1:, 0])[:, None] * g
    steps = np.asarray(steps)
    assert np.all(steps <= bound * (1 + 1e-5))
    assert np.mean(np.isclose(steps, bound, rtol=1e-4)) > 0.5    # mostly clipped
