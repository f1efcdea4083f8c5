"""Streaming segment by segment equals one pass; the optax inner optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax.memory import (
    MemorySpec,
    apply_memory,
    apply_memory_optax,
    init_memory_params,
    initial_optax_state,
    initial_state,
)
from tests.memory_helpers import perturbed, random_inputs

B, H, D = 2, 2, 4
SEGMENTS = (8, 8, 5)   # multiples of C = 4, the last one partial


def _split(x, lengths):
    out, start = [], 0
    for n in lengths:
        out.append(x[:, start:start + n])
        start += n
    return out


def _assert_trees_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


@pytest.mark.parametrize("kind,path", [("linear", "chunked"), ("mlp", "chunked")])
def test_segments_equal_one_pass(kind, path):
    inputs = random_inputs(1, B, sum(SEGMENTS), H, D, D)
    spec = MemorySpec(kind=kind, dgd=True, chunk_size=4, path=path)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(0), H, D, D), 3)
    run = jax.jit(apply_memory, static_argnums=0)
    state = initial_state(spec, params, B)
    y_full, state_full = run(spec, params, *inputs, state)
    ys = []
    for seg in zip(*(_split(x, SEGMENTS) for x in inputs), strict=True):
        y, state = run(spec, params, *seg, state)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, atol=1e-5)
    _assert_trees_close(state, state_full)
    assert np.abs(np.asarray(state.momentum["w0"])).max() > 1e-3


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_bf16_state_passed_in_is_carried_in_fp32(kind):
    inputs = random_inputs(2, B, 8, H, D, D)
    spec = MemorySpec(kind=kind, chunk_size=4)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(0), H, D, D), 3)
    state = initial_state(spec, params, B)
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    y_low, end_low = apply_memory(spec, params, *inputs, low)
    y_ref, _ = apply_memory(spec, params, *inputs,
                            jax.tree.map(lambda x: x.astype(jnp.float32), low))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(end_low))
    np.testing.assert_array_equal(y_low, y_ref)


def _hand_optax_loop(opt, w0, q, k, v, chunk):
    """One (batch, head): linear memory, l = ||W k - v||^2 summed over each chunk."""
    w, opt_state, ys = w0, opt.init(w0), []
    for start in range(0, q.shape[0], chunk):
        sl = slice(start, start + chunk)
        ys.append(q[sl] @ w.T)
        grad = jax.grad(lambda w_, k_=k[sl], v_=v[sl]: jnp.sum((k_ @ w_.T - v_) ** 2))(w)
        updates, opt_state = opt.update(grad, opt_state, w)
        w = w + updates
    return jnp.concatenate(ys), w


def test_optax_inner_optimizer_matches_hand_loop():
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
    q, k, v = random_inputs(2, B, 21, H, D, D)[:3]
    spec = MemorySpec(chunk_size=4)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(0), H, D, D), 3)
    y, state = jax.jit(apply_memory_optax, static_argnums=(0, 2))(spec, params, opt, q, k, v)
    for b in range(B):
        for h in range(H):
            y_ref, w_ref = _hand_optax_loop(opt, {"w0": params["w0"][h]}["w0"],
                                            q[b, :, h], k[b, :, h], v[b, :, h], 4)
            np.testing.assert_allclose(y[b, :, h], y_ref, atol=1e-5)
            np.testing.assert_allclose(state.params["w0"][b, h], w_ref, atol=1e-5)
    assert np.abs(np.asarray(state.params["w0"] - params["w0"][None])).max() > 1e-2


def test_optax_sgd_equals_chunked_gd():
    """optax.sgd(lr) per chunk == the GD rule with theta = lr, no momentum, no decay."""
    lr = 0.05
    q, k, v, theta, eta, alpha = random_inputs(4, B, 16, H, D, D)
    spec = MemorySpec(kind="mlp", momentum=False, weight_decay=False, dgd=True,
                      chunk_size=4)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(0), H, D, D), 3)
    sgd = optax.sgd(lr)
    _, state_opt = jax.jit(apply_memory_optax, static_argnums=(0, 2))(spec, params, sgd,
                                                                       q, k, v)
    _, state_gd = jax.jit(apply_memory, static_argnums=0)(
        spec, params, q, k, v, jnp.full_like(theta, lr), eta, alpha)
    _assert_trees_close(state_opt.params, state_gd.params)


def test_optax_segments_equal_one_pass():
    opt = optax.adam(0.05)
    q, k, v = random_inputs(6, B, sum(SEGMENTS), H, D, D)[:3]
    spec = MemorySpec(kind="mlp", chunk_size=4, remat_every=2)
    params = init_memory_params(spec, jax.random.PRNGKey(0), H, D, D)
    run = jax.jit(apply_memory_optax, static_argnums=(0, 2))
    state = initial_optax_state(spec, params, opt, B)
    y_full, state_full = run(spec, params, opt, q, k, v, state)
    ys = []
    for seg in zip(*(_split(x, SEGMENTS) for x in (q, k, v)), strict=True):
        y, state = run(spec, params, opt, *seg, state)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, atol=1e-5)
    _assert_trees_close(state, state_full)
