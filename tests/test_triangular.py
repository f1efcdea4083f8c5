"""The unit lower-triangular solve of the chunked DGD update against LAPACK-style
``solve_triangular`` (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.memory.triangular import (
    unit_lower_inverse,
    unit_lower_inverse_by_masks,
    unit_lower_solve,
    unit_lower_solve_by_masks,
)

# The XLA form (block reshapes) and the kernel-body form (index masks, whole matrices).
FORMS = pytest.mark.parametrize("unit_lower_inverse,unit_lower_solve", [
    (unit_lower_inverse, unit_lower_solve),
    (unit_lower_inverse_by_masks, unit_lower_solve_by_masks)], ids=["blocks", "masks"])


def _system(c: int, d: int = 5, batch=(2, 3), scale: float = 0.4):
    k1, k2 = jax.random.split(jax.random.key(c))
    n = jnp.tril(scale * jax.random.normal(k1, batch + (c, c)), -1)
    rhs = jax.random.normal(k2, batch + (c, d))
    return n, rhs


def _reference(n, rhs):
    c = n.shape[-1]
    return jax.scipy.linalg.solve_triangular(jnp.eye(c) + jnp.tril(n, -1), rhs, lower=True)


@FORMS
@pytest.mark.parametrize("c", [1, 3, 13, 32, 33])
def test_inverse_and_solve_match_triangular_solve(c, unit_lower_inverse, unit_lower_solve):
    n, rhs = _system(c)
    inverse = jax.jit(unit_lower_inverse)(n)
    np.testing.assert_allclose(inverse @ (jnp.eye(c) + n), np.broadcast_to(np.eye(c), n.shape),
                               atol=2e-5)
    np.testing.assert_array_equal(np.triu(np.asarray(inverse), 1), 0.0)
    np.testing.assert_allclose(jax.jit(unit_lower_solve)(n, rhs), _reference(n, rhs), rtol=1e-5,
                               atol=1e-5)


@FORMS
@pytest.mark.parametrize("c", [1, 5, 32])
def test_solve_gradients_match_triangular_solve(c, unit_lower_inverse, unit_lower_solve):
    n, rhs = _system(c)
    weights = jax.random.normal(jax.random.key(7), rhs.shape)

    def loss(solve):
        return lambda n, r: jnp.sum(weights * jnp.sin(solve(n, r)))

    got = jax.jit(jax.grad(loss(unit_lower_solve), (0, 1)))(n, rhs)
    want = jax.grad(loss(_reference), (0, 1))(n, rhs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    # N is structurally strictly lower: no gradient on or above the diagonal.
    np.testing.assert_array_equal(np.triu(np.asarray(got[0])), 0.0)


@FORMS
def test_only_the_strictly_lower_part_is_read(unit_lower_inverse, unit_lower_solve):
    n, rhs = _system(6, batch=())
    garbage = n + jnp.triu(jnp.full((6, 6), 3.0))
    np.testing.assert_array_equal(unit_lower_solve(garbage, rhs), unit_lower_solve(n, rhs))


def test_solve_under_vmap_and_jit():
    n, rhs = _system(16, batch=(4,))
    got = jax.jit(jax.vmap(unit_lower_solve))(n, rhs)
    np.testing.assert_allclose(got, _reference(n, rhs), rtol=1e-5, atol=1e-5)
