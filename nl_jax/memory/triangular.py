"""Unit lower-triangular systems ``(I + N) X = R`` of the chunked DGD updates.

The WY form of a chunk of DGD steps (NL Eq. 88, ``models/self_modifying.py``)
needs one such solve per layer and chunk, with ``N`` strictly lower triangular
([C, C], C the chunk size).  Two pieces, both plain matmuls (MXU-friendly, and
fast on XLA CPU where ``lax.linalg.triangular_solve`` on small batched
matrices is not):

* ``unit_lower_inverse``: ``(I + N)^-1`` by block doubling.  With the inverses
  ``A^-1, D^-1`` of two adjacent diagonal blocks and the block ``B`` below-left,
  ``[[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]``; starting from
  1x1 blocks (all 1) ``log2 C`` doublings give the inverse in ~C^3 / 3
  multiply-adds (repeated squaring of ``N`` needs ~8 C^3 at C = 32).
* ``unit_lower_inverse_by_masks``: the same doubling on whole ``C x C``
  matrices, the blocks selected by index masks (``D_2s^-1 = D_s^-1 - D_s^-1
  B_s D_s^-1`` with ``B_s`` the entries inside 2s-blocks but outside s-blocks):
  2 log2 C full products and no reshapes or gathers, for Pallas kernel bodies
  (Mosaic lowers neither a diagonal gather nor 6-d reshapes); any C;
* ``unit_lower_solve`` / ``unit_lower_solve_by_masks``: ``X = (I + N)^-1 R``
  under a custom VJP that reuses the inverse: ``dR = (I + N)^-T dX``,
  ``dN = -strictly_lower(dR X^T)``, two matmuls instead of differentiating the
  doubling.

Only the strictly lower part of ``N`` is read (its diagonal and upper part
are taken to be zero); leading axes of ``N`` and ``R`` are batch axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def _strictly_lower(x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    return jnp.where(jnp.arange(c)[:, None] > jnp.arange(c)[None, :], x, 0.0)


def unit_lower_inverse(strict_lower: jax.Array) -> jax.Array:
    """``(I + N)^-1`` for strictly lower-triangular ``N [..., C, C]`` (block doubling)."""
    c = strict_lower.shape[-1]
    if strict_lower.shape[-2] != c:
        raise ValueError(f"unit_lower_inverse: N must be square, got {strict_lower.shape}")
    size = 1 << max(0, (c - 1).bit_length())     # next power of two >= C
    batch = strict_lower.shape[:-2]
    n = jnp.pad(strict_lower, [(0, 0)] * len(batch) + [(0, size - c)] * 2)
    # Zero padding keeps the top-left C x C block of the inverse exact (lower triangular).
    blocks = jnp.ones(batch + (size, 1, 1), n.dtype)     # inverses of the 1x1 diagonal blocks
    s = 1
    while s < size:
        pairs = size // (2 * s)
        grid = n.reshape(batch + (pairs, 2, s, pairs, 2, s))
        # B_p = N[(2p+1)s:(2p+2)s, 2ps:(2p+1)s]: the diagonal over the two pair axes.
        below = jnp.diagonal(grid[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2)
        below = jnp.moveaxis(below, -1, -3)                      # [..., pairs, s, s]
        a_inv = blocks[..., 0::2, :, :]
        d_inv = blocks[..., 1::2, :, :]
        corner = -(d_inv @ below) @ a_inv
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        bottom = jnp.concatenate([corner, d_inv], axis=-1)
        blocks = jnp.concatenate([top, bottom], axis=-2)          # [..., pairs, 2s, 2s]
        s *= 2
    return blocks[..., 0, :c, :c]


def unit_lower_inverse_by_masks(strict_lower: jax.Array) -> jax.Array:
    """``(I + N)^-1`` for strictly lower-triangular ``N [..., C, C]`` by block doubling
    on whole matrices (module docstring): what a Pallas kernel body can lower."""
    c = strict_lower.shape[-1]
    i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    n = _strictly_lower(strict_lower)
    inverse = jnp.broadcast_to(jnp.where(i == j, 1.0, 0.0).astype(n.dtype), n.shape)
    s = 1
    while s < c:
        between = ((jax.lax.div(i, 2 * s) == jax.lax.div(j, 2 * s))
                   & (jax.lax.div(i, s) != jax.lax.div(j, s)))
        below = jnp.where(between, n, 0.0)
        inverse = inverse - jnp.matmul(jnp.matmul(inverse, below, precision=_HI), inverse,
                                       precision=_HI)
        s *= 2
    return inverse


def _solve_with(inverse_fn, doc: str):
    """``X = (I + N)^-1 R`` with ``inverse_fn`` under the shared custom VJP."""
    @jax.custom_vjp
    def solve(strict_lower: jax.Array, rhs: jax.Array) -> jax.Array:
        return inverse_fn(strict_lower) @ rhs

    def solve_fwd(strict_lower, rhs):
        inverse = inverse_fn(strict_lower)
        x = inverse @ rhs
        return x, (inverse, x)

    solve.defvjp(solve_fwd, _solve_bwd)
    solve.__doc__ = doc
    return solve


def _solve_bwd(residuals, dx):
    inverse, x = residuals
    d_rhs = jnp.swapaxes(inverse, -1, -2) @ dx
    d_lower = _strictly_lower(-(d_rhs @ jnp.swapaxes(x, -1, -2)))
    return d_lower, d_rhs


unit_lower_solve = _solve_with(
    unit_lower_inverse, "``X`` with ``(I + N) X = R``: ``N [..., C, C]`` strictly lower, "
    "``R [..., C, D]``.")
unit_lower_solve_by_masks = _solve_with(
    unit_lower_inverse_by_masks, "``unit_lower_solve`` by ``unit_lower_inverse_by_masks`` "
    "(Pallas kernel bodies).")
