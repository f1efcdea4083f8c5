"""Chunked dual form of the linear memory with an L2 or dot objective, blocked.

The same rule and semantics as ``chunked.py`` (see its docstring), written for
throughput on XLA.  The step errors of a linear memory are affine in the
chunk-start state,

    E = c K M_0^T + E_0,   l2: c = 2, E_0 = -2 V;   dot: c = 0, E_0 = -V;
    DGD adds M_0 k k^T, i.e. c += 1,

(with ``spec.grad_clip`` = G > 0 each row E_j is then scaled by
min(1, G / (|E_j| |k_j|)), the norm of token j's direction E_j k_j^T),

and the state after a chunk is (gates.py, NL_MATH.md section 1)

    M^T <- b M_0^T + f S_0^T - K^T diag(G[end]) E,   S^T <- m S_0^T - K^T diag(Le[end] theta) E,

with the outputs

    Y = diag(beta) Q M_0^T + diag(f) Q S_0^T - ((Q K^T) * G) E.

Execution: the chunks are processed in blocks of ``spec.remat_every`` chunks by
a scan over blocks whose body is rematerialised (backward memory: one state per
block plus one block's activations); the chunks left over (up to a block, the
last one partial) form one more rematerialised block after the scan, so the
scan body knows statically that every chunk ends at row C - 1.  Inside a
block, everything that does not depend on the state (gate matrices, Q K^T,
K^T) is batched over the block's chunks, the state recurrence is a short
unrolled loop of two GEMMs per chunk ([K; Q] M_0^T, then K^T times the
errors weighted for both state updates), and the outputs are one batched
computation again.
Blocks keep the working set in cache and give XLA few, large ops: on the 2-core
CPU this is 2.5x faster forward and 2x faster backward than one scan over all
chunks with batched pre- and post-processing (docs/benchmarks.md).

Gate products prod_{j<l<=i} x_l are exp(s_ij) of the segment sums
s_ij = sum_{j<l<=i} log x_l, masked to -inf above the diagonal before the
exponential: every exponent is <= 0, nothing overflows, the diagonal is exactly
1.  s_ij is a difference of in-chunk prefix sums, made exact where it matters
(``gate_products``): a plain fp32 difference loses ~sqrt(C) ulp(|cs_i|), a
relative error of ~1e-3 on O(1) products that follow 1e-7 gates in a chunk.
Prefix sums are a GEMM with a triangular 0/1 matrix: ``jnp.cumsum`` is a
reduce-window that XLA:CPU fuses into its consumers and recomputes per element
(6x slower).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nl_jax.errors import ConfigError
from nl_jax.memory.maps import clip_errors
from nl_jax.memory.spec import MemorySpec
from nl_jax.sharding import local_mesh_axes

_HI = jax.lax.Precision.HIGHEST
_MAX_UNROLL = 8


def supports(spec: MemorySpec) -> bool:
    """Whether this fast path implements ``spec``."""
    return spec.kind == "linear" and spec.objective in ("l2", "dot")


def _upper(c: int) -> jax.Array:
    """``[C, C]`` 0/1 matrix, 1 where column >= row."""
    return jnp.asarray(np.triu(np.ones((c, c), np.float32)))


def prefix_sums(x: jax.Array) -> jax.Array:
    """``[..., C]`` inclusive prefix sums along the last axis, as one GEMM."""
    return jnp.matmul(x, _upper(x.shape[-1]), precision=_HI)


_LOG_GRID = 2.0 ** -9   # coarse part of a log gate: a multiple of this
LOG_FLOOR = -80.0       # log gates below (gates < 2e-35) count as e^-80


def log_gates(eta: jax.Array, alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log eta and log(1 - alpha), floored at ``LOG_FLOOR``.

    A gate of exactly 0 (fp32 ``sigmoid`` gives alpha = 1.0 from a logit of
    ~17) would put -inf, and NaN, into the prefix sums; the double ``where``
    keeps its gradient 0 instead of 0 * inf.
    """
    eta_ok, alpha_ok = eta > 0.0, alpha < 1.0
    log_eta = jnp.where(eta_ok, jnp.log(jnp.where(eta_ok, eta, 1.0)), LOG_FLOOR)
    log_a = jnp.where(alpha_ok, jnp.log1p(-jnp.where(alpha_ok, alpha, 0.0)), LOG_FLOOR)
    return jnp.maximum(log_eta, LOG_FLOOR), jnp.maximum(log_a, LOG_FLOOR)


@jax.custom_vjp
def gate_products(log_x: jax.Array) -> jax.Array:
    """``[..., C] -> [..., C, C]``: prod_{j<l<=i} x_l on and below the diagonal, 0 above.

    ``log_x`` must be >= ``LOG_FLOOR`` (``log_gates``).  Forward: the segment
    sums are differences of prefix sums, split so that they are exact up to the
    rounding of small numbers: log x = coarse + fine with coarse on a 2^-9
    grid.  Every partial sum of the coarse parts is a multiple of 2^-9 below
    2^24 * 2^-9 (C * 80 * 2^9 < 2^24 for C <= 409), hence exact in fp32 in any
    summation order, and so is the difference of two of them; the fine parts
    are below 2^-10 each, so their prefix sums and differences err by ~1e-8.
    Products are then accurate to ~1e-7 relative whatever the gates before
    them in the chunk.  Backward (``_gate_products_bwd``): exact too.
    """
    return _gate_products_fwd(log_x)[0]


def _gate_products_fwd(log_x):
    c = log_x.shape[-1]
    coarse = jnp.round(log_x / _LOG_GRID) * _LOG_GRID
    hi, lo = prefix_sums(coarse), prefix_sums(log_x - coarse)
    sums = (hi[..., :, None] - hi[..., None, :]) + (lo[..., :, None] - lo[..., None, :])
    lower = np.tril(np.ones((c, c), bool))
    products = jnp.exp(jnp.where(lower, sums, -jnp.inf))
    return products, products


def _gate_products_bwd(products, cotangent):
    """d/d log x_l = sum over the segments that contain l, i.e. the rectangle
    i >= l > j, of cotangent * product.  Summed directly (a suffix sum over i
    as a GEMM with a triangular 0/1 matrix, then a masked row sum over j < l):
    every term carries x_l, so a tiny gate gets a small, accurate gradient.
    Back-propagating through the prefix-sum differences instead would cancel
    O(1) terms and leave ~1e-7 absolute error, i.e. 1e-7 / x relative error on
    d/dx (80% at x = 1e-6)."""
    c = products.shape[-1]
    weighted = cotangent * products
    suffix = jnp.einsum("li,...ij->...lj", _upper(c), weighted,   # sum over i >= l
                        precision=_HI)
    strictly_lower = np.tril(np.ones((c, c), bool), -1)              # j < l
    return (jnp.sum(jnp.where(strictly_lower, suffix, 0.0), axis=-1),)


gate_products.defvjp(_gate_products_fwd, _gate_products_bwd)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched ``a @ b`` over the leading axes, fp32."""
    return jnp.matmul(a, b, precision=_HI)


def _last_index(vec, last):
    """``[S, ..., C] -> [S, ...]``: each chunk's entry at its last real token."""
    c = vec.shape[-1]
    if last is None:
        return vec[..., c - 1]
    idx = np.asarray(last, np.int32).reshape((-1,) + (1,) * (vec.ndim - 1))
    return jnp.take_along_axis(vec, jnp.asarray(idx), axis=-1)[..., 0]


def _last_row(mat, last):
    """``[S, ..., C, C] -> [S, ..., C]``: each chunk's row at its last real token."""
    c = mat.shape[-1]
    if last is None:
        return mat[..., c - 1, :]
    idx = np.asarray(last, np.int32).reshape((-1,) + (1,) * (mat.ndim - 1))
    return jnp.take_along_axis(mat, jnp.asarray(idx), axis=-2)[..., 0, :]


def chunk_terms(spec: MemorySpec, x: dict, last: tuple[int, ...] | None) -> dict:
    """The state-independent quantities of S chunks (``x`` leaves ``[S, B, H, C, ...]``).

    Returns ``e0`` (the errors at M = 0), the gate matrix ``gate`` G ``[S, B, H,
    C, C]``, the per-token output coefficients ``beta`` and ``f`` (None without
    momentum), the per-token weights of the two state updates ``w_g`` = G[end]
    and ``w_h`` = Le[end] theta (None without momentum), and each chunk's end
    coefficients ``end_beta``, ``end_f``, ``end_m`` ``[S, B, H]`` (module
    docstring).  ``last``: each chunk's last real token (static), None when
    every chunk is full.
    """
    eta, alpha = x["eta"], x["alpha"]
    log_eta, log_a = log_gates(eta, alpha)
    if not spec.weight_decay:
        log_a = jnp.zeros_like(alpha)
    beta = jnp.exp(prefix_sums(log_a))
    la = gate_products(log_a)
    terms = {"e0": (-2.0 if spec.objective == "l2" else -1.0) * x["v"], "beta": beta,
             "end_beta": _last_index(beta, last)}
    if spec.momentum:
        m = jnp.exp(prefix_sums(log_eta))
        le_theta = gate_products(log_eta) * x["theta"][..., None, :]
        f = jnp.einsum("...ir,...r->...i", la, m, precision=_HI)
        gate = _mm(la, le_theta)
        terms.update(gate=gate, f=f, w_g=_last_row(gate, last),
                     w_h=_last_row(le_theta, last), end_f=_last_index(f, last),
                     end_m=_last_index(m, last))
    else:
        gate = la * x["theta"][..., None, :]
        terms.update(gate=gate, f=None, w_g=_last_row(gate, last), w_h=None,
                     end_f=None, end_m=None)
    return terms


def _block(spec: MemorySpec, coef: float, state, x: dict, last: tuple[int, ...] | None):
    """One block of S chunks: ``x`` leaves ``[S, B, H, C, ...]``.

    ``state`` is (M^T, S^T), each ``[B, H, d_k, d_v]``; returns it after the
    block and the outputs ``[S, B, H, C, d_v]``.  ``last``: the index of each
    chunk's last real token (static), None when every chunk is full.
    """
    q, k = x["q"], x["k"]
    c = q.shape[-2]
    terms = chunk_terms(spec, x, last)
    e0, gate, beta, f = terms["e0"], terms["gate"], terms["beta"], terms["f"]
    k_t = jnp.swapaxes(k, -1, -2)                                  # [S, B, H, d_k, C]
    if spec.momentum:
        # per-token weights of the two state updates: G[end] and Le[end] theta
        row_weights = (terms["w_g"][..., None], terms["w_h"][..., None])
        coefs = jnp.stack([terms["end_beta"], terms["end_f"], terms["end_m"]], axis=-1)
    else:
        row_weights = (terms["w_g"][..., None],)
        coefs = terms["end_beta"][..., None]
    d_v = e0.shape[-1]

    k_sq = jnp.sum(k * k, -1) if spec.grad_clip > 0 else None   # |k_j|^2 for the clip

    def chunk_step(carry, xs):
        w_t, s_t = carry
        kq_c, kt_c, e0_c, weights, cf, k_sq_c = xs
        # [K; Q] M_0^T: the errors and the outputs' Q M_0^T from one GEMM
        kq_w = _mm(kq_c, w_t)
        err = e0_c + coef * kq_w[..., :c, :] if coef else e0_c
        err = clip_errors(err, k_sq_c, spec.grad_clip)   # token j's direction E_j k_j^T
        # both state updates from one GEMM: K^T [diag(G[end]) E, diag(Le[end] theta) E]
        steps = _mm(kt_c, jnp.concatenate([r * err for r in weights], axis=-1))
        cf = cf[..., None, None]
        if spec.momentum:
            w_new = cf[..., 0, :, :] * w_t + cf[..., 1, :, :] * s_t - steps[..., :d_v]
            s_new = cf[..., 2, :, :] * s_t - steps[..., d_v:]
            return (w_new, s_new), (kq_w[..., c:, :], s_t, err)
        return (cf[..., 0, :, :] * w_t - steps, s_t), (kq_w[..., c:, :], err)

    n_chunks = q.shape[0]
    state, outs = jax.lax.scan(chunk_step, state,
                               (jnp.concatenate([k, q], axis=-2), k_t, e0, row_weights, coefs,
                                k_sq),
                               unroll=min(n_chunks, _MAX_UNROLL))
    scores = _mm(q, k_t) * gate
    q_w, errors = outs[0], outs[-1]
    y = beta[..., None] * q_w - _mm(scores, errors)
    if spec.momentum:
        y = y + f[..., None] * _mm(q, outs[1])
    return state, y


def linear_chunked(spec: MemorySpec, w0: jax.Array, s0: jax.Array, q, k, v, theta, eta,
                   alpha, t_real: int):
    """Chunked linear memory on chunk-major inputs (``api.apply_memory``).

    Args:
      w0, s0: ``[B, H, d_v, d_k]`` state.  q, k: ``[N, B, H, C, d_k]``;
        v: ``[N, B, H, C, d_v]``; gates ``[N, B, H, C]``.  ``t_real``: number
        of real tokens (static); the tokens after it are padding: the state
        is carried from each chunk's last real token.

    Returns:
      y ``[N, B, H, C, d_v]`` and the state (M, S) after token ``t_real``.
    """
    n, _, _, c, _ = q.shape
    if n == 0:      # an empty segment: no outputs, the state unchanged
        return jnp.zeros(v.shape, jnp.float32), (w0, s0)
    coef = (2.0 if spec.objective == "l2" else 0.0) + (1.0 if spec.dgd else 0.0)
    size = min(spec.remat_every, n)
    n_blocks = (t_real // c) // size            # blocks whose chunks are all full
    split = n_blocks * size
    xs = {"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha}
    state = (jnp.swapaxes(w0, -1, -2), jnp.swapaxes(s0, -1, -2))
    ys = []
    if n_blocks:
        blocks = jax.tree.map(
            lambda x: x[:split].reshape((n_blocks, size) + x.shape[1:]), xs)
        body = jax.checkpoint(lambda carry, x: _block(spec, coef, carry, x, None))
        state, y = jax.lax.scan(body, state, blocks)
        ys.append(y.reshape((split,) + y.shape[2:]))
    if split < n:   # at most `size` chunks left, the last maybe partial
        last = tuple(min(c, t_real - i * c) - 1 for i in range(split, n))
        last = None if t_real >= n * c else last       # all full: row C - 1
        tail = jax.checkpoint(lambda carry, x: _block(spec, coef, carry, x, last))
        state, y = tail(state, jax.tree.map(lambda x: x[split:], xs))
        ys.append(y)
    y = ys[0] if len(ys) == 1 else jnp.concatenate(ys)
    w_t, s_t = state
    return y, (jnp.swapaxes(w_t, -1, -2), jnp.swapaxes(s_t, -1, -2))


def linear_kernel(spec: MemorySpec, w0: jax.Array, s0: jax.Array, q, k, v, theta, eta,
                  alpha, t_real: int, interpret: bool | None = None):
    """``linear_chunked`` with the chunk recurrence in the Pallas kernel
    (``kernels/linear_memory.py``): the state-independent terms of every chunk
    are computed here at once (``chunk_terms``), the recurrence over chunks runs
    in the kernel with the state resident on chip.  Same arguments and results."""
    from kernels.linear_memory import ROWS, chunk_recurrence

    backend = jax.default_backend()
    if interpret is None and backend not in ("cpu", "tpu"):
        raise ConfigError(f"memory path='kernel' is a Mosaic TPU kernel and cannot run on "
                          f"{backend}; use path='chunked' (e.g. "
                          f"--config.model.memory.path=chunked)")
    n, _, _, c, _ = q.shape
    if n == 0:
        return jnp.zeros(v.shape, jnp.float32), (w0, s0)
    coef = (2.0 if spec.objective == "l2" else 0.0) + (1.0 if spec.dgd else 0.0)
    last = None if t_real >= n * c else tuple(min(c, t_real - i * c) - 1 for i in range(n))
    x = {"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha}
    terms = chunk_terms(spec, x, last)
    zeros = jnp.zeros_like(terms["beta"])
    per_token = dict(terms, k_sq=jnp.sum(k * k, -1) if spec.grad_clip > 0 else zeros)
    for name in ("end_beta", "end_f", "end_m"):      # one scalar per chunk, in every lane
        if per_token[name] is not None:
            per_token[name] = jnp.broadcast_to(per_token[name][..., None], zeros.shape)
    rows = jnp.stack([zeros if per_token[name] is None else per_token[name]
                      for name in ROWS], axis=-2)                     # [N, B, H, 8, C]
    states = (jnp.swapaxes(w0, -1, -2), jnp.swapaxes(s0, -1, -2))[:2 if spec.momentum else 1]

    def run(*arrays):          # -> y and the final states
        out = chunk_recurrence(*arrays, coef=coef, momentum=spec.momentum,
                               grad_clip=spec.grad_clip, interpret=interpret)
        return out[:1 + len(states)]

    # (batch, head) pairs are independent: on a mesh each device runs the kernel on
    # its own rows and heads (XLA cannot partition a Mosaic call)
    placement = local_mesh_axes(("batch", "heads"), q.shape[1:3])
    if placement is not None:
        mesh, (rows_axes, heads_axes) = placement
        chunks, state = P(None, rows_axes, heads_axes), P(rows_axes, heads_axes)
        run = jax.shard_map(run, mesh=mesh, in_specs=(chunks,) * 5 + (state,) * len(states),
                            out_specs=(chunks,) + (state,) * len(states), check_vma=False)
    y, m_t, *s_t = run(q, k, terms["e0"], terms["gate"], rows, *states)
    s_end = jnp.swapaxes(s_t[0], -1, -2) if spec.momentum else s0
    return y, (jnp.swapaxes(m_t, -1, -2), s_end)
