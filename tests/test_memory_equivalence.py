"""The chunked dual form equals the oracle scan on values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.memory import MemorySpec, apply_memory, init_memory_params
from tests.memory_helpers import perturbed, random_inputs

B, T, H, D = 2, 37, 2, 8


def _loss_and_grads(spec, params, inputs):
    """(y, final state, grads w.r.t. inputs, gates and initial weights)."""
    wy = jax.random.normal(jax.random.PRNGKey(11), inputs[0].shape)

    def loss(params, *inputs):
        y, state = apply_memory(spec, params, *inputs)
        ws = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape)), state)
        state_term = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(state),
                                                        jax.tree.leaves(ws), strict=True))
        return jnp.sum(wy * y) + state_term, (y, state)

    argnums = tuple(range(7))
    (_, (y, state)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
        params, *inputs)
    return y, state, grads


CASES = [
    # kind, objective, momentum, weight_decay, dgd, chunk sizes
    ("linear", "l2", True, True, True, (1, 4, 16)),
    ("mlp", "l2", True, True, True, (1, 16)),
    ("linear", "huber", True, True, False, (4,)),
    ("linear", "dot", False, False, True, (4,)),
    ("linear", "l2", False, True, False, (8,)),
]


@pytest.mark.parametrize("kind,objective,momentum,decay,dgd,chunks", CASES)
def test_chunked_matches_oracle(kind, objective, momentum, decay, dgd, chunks):
    """T = 37 with blocks of 3 chunks: full blocks, left-over chunks, a partial one."""
    _check_chunked_against_oracle(kind, objective, momentum, decay, dgd, chunks, T)


def test_chunked_matches_oracle_with_full_blocks_only():
    """T = 48, C = 4, blocks of 3: every block full, no left-over chunks."""
    _check_chunked_against_oracle("linear", "l2", True, True, True, (4,), 48)


def test_chunked_matches_oracle_with_long_blocks():
    """Blocks of 10 chunks: the linear path's forward loops over them instead of
    unrolling; C = 2 leaves a partial tail of 9 chunks, looped too."""
    _check_chunked_against_oracle("linear", "l2", True, True, True, (1, 2), T, remat_every=10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_chunked_matches_oracle_with_grad_clip(kind):
    """Clipped token directions (most tokens clipped at G = 1.5) on both paths."""
    _check_chunked_against_oracle(kind, "l2", True, True, True, (1, 4), T, grad_clip=1.5)
    inputs = random_inputs(0, B, T, H, D, D)
    spec = MemorySpec(kind=kind, chunk_size=4, grad_clip=1.5)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(1), H, D, D), 2)
    clipped = apply_memory(spec, params, *inputs)[0]
    free = apply_memory(dataclasses.replace(spec, grad_clip=0.0), params, *inputs)[0]
    assert np.abs(np.asarray(clipped - free)).max() > 0.1     # the clip is active


@pytest.mark.parametrize("momentum,depth,objective,grad_clip", [
    (False, 2, "l2", 0.0), (True, 3, "huber", 1.5)])
def test_chunked_mlp_matches_oracle_without_momentum_and_deeper(momentum, depth, objective,
                                                                grad_clip):
    """The MLP chunk step's state layouts without momentum (W alone) and with a
    middle layer (neither the first nor the last), with DGD and clipping."""
    _check_chunked_against_oracle("mlp", objective, momentum, True, True, (4,), T,
                                  grad_clip=grad_clip, mlp_depth=depth)


def _check_chunked_against_oracle(kind, objective, momentum, decay, dgd, chunks, t,
                                  grad_clip=0.0, remat_every=3, **spec_fields):
    inputs = random_inputs(0, B, t, H, D, D)
    for chunk in chunks:
        spec = MemorySpec(kind=kind, objective=objective, momentum=momentum,
                          weight_decay=decay, dgd=dgd, chunk_size=chunk, path="oracle",
                          grad_clip=grad_clip, **spec_fields)
        params = perturbed(init_memory_params(spec, jax.random.PRNGKey(1), H, D, D), 2)
        y_o, s_o, g_o = _loss_and_grads(spec, params, inputs)
        chunked = dataclasses.replace(spec, path="chunked", remat_every=remat_every)
        y_c, s_c, g_c = _loss_and_grads(chunked, params, inputs)
        assert np.abs(np.asarray(y_o)).max() > 0.1
        np.testing.assert_allclose(y_c, y_o, atol=1e-5, err_msg=f"y, C={chunk}")
        for a, b in zip(jax.tree.leaves(s_c), jax.tree.leaves(s_o), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"state, C={chunk}")
        names = ["init_params", "q", "k", "v", "theta", "eta", "alpha"]
        for name, a, b in zip(names, g_c, g_o, strict=True):
            for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                assert np.all(np.isfinite(la))
                scale = max(1.0, float(np.abs(lb).max()))
                np.testing.assert_allclose(la, lb, atol=1e-4 * scale,
                                           err_msg=f"grad {name}, C={chunk}")
        if momentum:
            assert np.abs(np.asarray(g_o[5])).max() > 1e-3   # eta matters
        if decay:
            assert np.abs(np.asarray(g_o[6])).max() > 1e-3   # alpha matters

