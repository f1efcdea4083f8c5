"""Chunked dual form of the linear memory with an L2 or dot objective, batched.

The same rule and semantics as ``chunked.py`` (see its docstring), written for
throughput on XLA: the step errors of a linear memory are affine in the
chunk-start state,

    E = c K M_0^T + E_0,   l2: c = 2, E_0 = -2 V;   dot: c = 0, E_0 = -V;
    DGD adds M_0 k k^T, i.e. c += 1,

so everything chunk-local (gate matrices, Q K^T) is computed once for all
chunks, batched, outside the scan; the sequential scan carries only the d x d
fp32 state (M, S) over chunks in chunk-major layout ``[N, B, H, ...]`` and
emits the chunk-start states and the errors E; the outputs

    Y = diag(beta) Q M_0^T + diag(f) Q S_0^T - ((Q K^T) * G) E      (NL_MATH.md 1)

are then one batched computation over all chunks.  Log-space segment sums of
the gates are one GEMM with a constant 0/1 tensor (``gate_products``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nl_jax.memory.scan import grouped_scan
from nl_jax.memory.spec import MemorySpec

_HI = jax.lax.Precision.HIGHEST


def supports(spec: MemorySpec) -> bool:
    """Whether this fast path implements ``spec``."""
    return spec.kind == "linear" and spec.objective in ("l2", "dot")


def segment_sum_tensor(c: int) -> np.ndarray:
    """Constant ``[C(l), C(i), C(j)]`` 0/1 tensor T[l, i, j] = [j < l <= i]."""
    l = np.arange(c)[:, None, None]
    i = np.arange(c)[None, :, None]
    j = np.arange(c)[None, None, :]
    return ((j < l) & (l <= i)).astype(np.float32)


def gate_products(log_x: jax.Array) -> jax.Array:
    """``[..., C] -> [..., C, C]``: prod_{j<l<=i} x_l = exp(segsum(log x)), 0 above the diagonal.

    segsum(log x)[i, j] = sum_l log x_l [j < l <= i] is one GEMM of the log
    gates with a constant 0/1 tensor: a sum of the masked terms, no difference
    of prefix sums, and never exp(g) * exp(-g).
    """
    c = log_x.shape[-1]
    sums = jnp.einsum("...l,lij->...ij", log_x, jnp.asarray(segment_sum_tensor(c)),
                      precision=_HI)
    lower = jnp.asarray(np.tril(np.ones((c, c), np.float32)))
    return jnp.exp(sums) * lower


def chunk_gate_matrices(theta, eta, alpha, use_momentum: bool, use_decay: bool):
    """beta, f, m ``[..., C]``, G and Le * theta ``[..., C, C]`` (``gates.py``)."""
    log_a = jnp.log1p(-alpha) if use_decay else jnp.zeros_like(alpha)
    la = gate_products(log_a)
    beta = jnp.exp(jnp.cumsum(log_a, axis=-1))
    if use_momentum:
        log_eta = jnp.log(eta)
        le_theta = gate_products(log_eta) * theta[..., None, :]
        m = jnp.exp(jnp.cumsum(log_eta, axis=-1))
        f = jnp.einsum("...ir,...r->...i", la, m, precision=_HI)
        gate = jnp.einsum("...ir,...rj->...ij", la, le_theta, precision=_HI)
    else:
        m = jnp.zeros_like(theta)
        f = jnp.zeros_like(theta)
        le_theta = None
        gate = la * theta[..., None, :]
    return beta, f, m, gate, le_theta


def linear_chunked(spec: MemorySpec, w0: jax.Array, s0: jax.Array, q, k, v, theta, eta,
                   alpha, t_real: int):
    """Chunked linear memory on chunk-major inputs.

    Args:
      w0, s0: ``[B, H, d_v, d_k]`` state.  q, k: ``[N, B, H, C, d_k]``;
        v: ``[N, B, H, C, d_v]``; gates ``[N, B, H, C]`` (padded tokens: theta 0,
        eta 1, alpha 0).  ``t_real``: number of real tokens (static).

    Returns:
      y ``[N, B, H, C, d_v]`` and the state (M, S) after token ``t_real``.
    """
    n, _, _, c, _ = q.shape
    coef = (2.0 if spec.objective == "l2" else 0.0) + (1.0 if spec.dgd else 0.0)
    base_err = -2.0 * v if spec.objective == "l2" else -v
    beta, f, m, gate, le_theta = chunk_gate_matrices(theta, eta, alpha, spec.momentum,
                                                     spec.weight_decay)
    k_t = jnp.swapaxes(k, -1, -2)                        # [N, B, H, d_k, C]
    # state-carrying weights of each chunk: its last real token's row
    n_valid = np.clip(t_real - np.arange(n) * c, 0, c)
    end = jnp.asarray(np.maximum(n_valid - 1, 0))
    has = jnp.asarray(n_valid > 0)[:, None, None]

    def end_row(x, fill):   # x [N, B, H, C] -> value at row end[n]
        picked = jnp.take_along_axis(x, end[:, None, None, None], axis=-1)[..., 0]
        return jnp.where(has, picked, fill)

    def end_gate_row(x):    # x [N, B, H, C(i), C(j)] -> row i = end[n], as [..., C, 1]
        picked = jnp.take_along_axis(x, end[:, None, None, None, None], axis=-2)
        return jnp.where(has[..., None, None], jnp.swapaxes(picked, -1, -2), 0.0)

    def mm(a, b):           # batched a @ b over leading axes, fp32
        return jnp.matmul(a, b, precision=_HI)

    xs = {"k": k, "k_t": k_t, "e0": base_err, "beta": end_row(beta, 1.0),
          "gate": end_gate_row(gate)}
    if spec.momentum:
        xs.update(f=end_row(f, 0.0), m=end_row(m, 1.0), mgate=end_gate_row(le_theta))
    group = spec.remat_every
    total = -(-n // group) * group
    if total != n:   # identity chunks: no tokens, state unchanged
        fills = {"beta": 1.0, "m": 1.0}
        xs = {key: jnp.concatenate([x, jnp.full((total - n,) + x.shape[1:],
                                                fills.get(key, 0.0), x.dtype)])
              for key, x in xs.items()}

    def step(carry, x):
        # the state is carried transposed, M^T [B, H, d_k, d_v], so that every
        # product is a plain (non-transposed) GEMM
        w_t, s_t = carry
        err = x["e0"]
        if coef:
            err = err + coef * mm(x["k"], w_t)
        if spec.momentum:
            # both state updates from one product K^T [E * g, E * g']
            steps = mm(x["k_t"], jnp.concatenate([err * x["gate"], err * x["mgate"]],
                                                 axis=-1))
            d_v = err.shape[-1]
            w_new = (x["beta"][..., None, None] * w_t + x["f"][..., None, None] * s_t
                     - steps[..., :d_v])
            s_new = x["m"][..., None, None] * s_t - steps[..., d_v:]
        else:
            w_new = x["beta"][..., None, None] * w_t - mm(x["k_t"], err * x["gate"])
            s_new = s_t
        return (w_new, s_new), (w_t, s_t, err)

    init = (jnp.swapaxes(w0, -1, -2), jnp.swapaxes(s0, -1, -2))
    (w_t, s_t), (w_starts, s_starts, errors) = grouped_scan(step, init, xs, group)
    w_starts, s_starts, errors = w_starts[:n], s_starts[:n], errors[:n]
    scores = mm(q, k_t) * gate
    y = beta[..., None] * mm(q, w_starts) - mm(scores, errors)
    if spec.momentum:
        y = y + f[..., None] * mm(q, s_starts)
    return y, (jnp.swapaxes(w_t, -1, -2), jnp.swapaxes(s_t, -1, -2))
