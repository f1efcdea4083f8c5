"""Chunk gate matrices of the momentum + forgetting rule, in log space.

Within a chunk (Titans Eq. 13-14 unrolled, docs/equations.md section 1), with
a_l = 1 - alpha_l and per-token step directions u_j taken at the chunk start:

    S_i = m_i S_0 - sum_{j<=i} Le[i, j] theta_j u_j
    M_i = beta_i M_0 + f_i S_0 - sum_{j<=i} G[i, j] u_j
    beta_i = prod_{l<=i} a_l,  m_i = prod_{l<=i} eta_l,
    La[i, j] = prod_{j<l<=i} a_l,  Le[i, j] = prod_{j<l<=i} eta_l,
    f = La m,  G = La (Le * theta[None, :]).

Products are exp(segsum(log x)) with the segment sums formed directly (a
masked cumulative sum, no difference of prefix sums), never exp(g) * exp(-g).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def segsum(x: jax.Array) -> jax.Array:
    """``[..., C] -> [..., C, C]``: sum_{j<l<=i} x_l on and below the diagonal, -inf above.

    Each entry is a sum of the masked terms x_l [l > j] over l <= i, formed as
    one product with the 0/1 lower-triangular matrix (no difference of prefix
    sums, so no cancellation).
    """
    c = x.shape[-1]
    i = jnp.arange(c)[:, None]
    j = jnp.arange(c)[None, :]
    terms = jnp.where(i > j, x[..., :, None], 0.0)
    lower = (i >= j).astype(x.dtype)
    sums = jnp.einsum("il,...lj->...ij", lower, terms,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.where(i >= j, sums, -jnp.inf)


class ChunkGates(NamedTuple):
    """Gate weights of one chunk (see module docstring).

    beta, f: ``[C]``; gate: G ``[C, C]``; the ``end_*`` fields are row
    ``n_valid - 1`` (the chunk's last real token) used to carry the state to the
    next chunk: end_beta, end_f, end_m scalars, end_gate = G[end] and
    end_momentum_gate = Le[end] * theta, both ``[C]``.  A chunk without real
    tokens gets the identity (1, 0, 1, zeros, zeros).
    """

    beta: jax.Array
    f: jax.Array
    gate: jax.Array
    end_beta: jax.Array
    end_f: jax.Array
    end_m: jax.Array
    end_gate: jax.Array
    end_momentum_gate: jax.Array


def chunk_gates(theta: jax.Array, eta: jax.Array, alpha: jax.Array, n_valid: jax.Array,
                use_momentum: bool, use_decay: bool) -> ChunkGates:
    """Gate matrices of one chunk from per-token gates ``[C]`` in (0, 1)."""
    c = theta.shape[-1]
    hp = jax.lax.Precision.HIGHEST
    log_a = jnp.log1p(-alpha) if use_decay else jnp.zeros_like(alpha)
    la = jnp.exp(segsum(log_a))
    beta = jnp.exp(jnp.cumsum(log_a))
    if use_momentum:
        log_eta = jnp.log(eta)
        le = jnp.exp(segsum(log_eta))
        m = jnp.exp(jnp.cumsum(log_eta))
        f = jnp.matmul(la, m, precision=hp)
    else:
        le = jnp.eye(c, dtype=theta.dtype)
        m = jnp.zeros_like(theta)
        f = jnp.zeros_like(theta)
    le_theta = le * theta[None, :]
    gate = jnp.matmul(la, le_theta, precision=hp)
    end = jnp.clip(n_valid - 1, 0, c - 1)
    has = n_valid > 0
    return ChunkGates(
        beta=beta, f=f, gate=gate,
        end_beta=jnp.where(has, beta[end], 1.0),
        end_f=jnp.where(has, f[end], 0.0),
        end_m=jnp.where(has, m[end], 1.0),
        end_gate=jnp.where(has, gate[end], 0.0),
        end_momentum_gate=jnp.where(has, le_theta[end], 0.0))
