"""Chunked dual form of the linear memory with an L2 or dot objective, blocked.

The same rule and semantics as ``chunked.py`` (see its docstring), written for
throughput on XLA.  The step errors of a linear memory are affine in the
chunk-start state,

    E = c K M_0^T + E_0,   l2: c = 2, E_0 = -2 V;   dot: c = 0, E_0 = -V;
    DGD adds M_0 k k^T, i.e. c += 1,

(with ``spec.grad_clip`` = G > 0 each row E_j is then scaled by
min(1, G / (|E_j| |k_j|)), the norm of token j's direction E_j k_j^T),

and the state after a chunk is (gates.py, docs/equations.md section 1)

    M^T <- b M_0^T + f S_0^T - K^T diag(G[end]) E,   S^T <- m S_0^T - K^T diag(Le[end] theta) E,

with the outputs

    Y = diag(beta) Q M_0^T + diag(f) Q S_0^T - ((Q K^T) * G) E.

Execution: inputs are token-major ``[B, T, H, ...]``; the chunks are processed
in blocks of ``spec.remat_every`` chunks by a scan over blocks; the chunks left
over (up to a block, the last one partial) form one more block after the
scan, so the scan body knows statically that every chunk ends at row C - 1.
Forward and backward are two programs (a custom VJP, ``_chunks``):

* forward (``_block_forward``): per block, the gate terms (``chunk_terms``) are
  batched over the block's chunks; then a short loop over its chunks cuts each
  chunk's q, k, v from the token-major inputs (the transposition to
  ``[B, H, C, d]`` happens chunk by chunk, in cache, never for the whole
  sequence), runs the recurrence (K M_0^T, then K^T times the errors weighted
  for both state updates: one GEMM) and the chunk's outputs from the state it
  holds (Q [M_0 | S_0]^T one GEMM, then ((Q K^T) * G) E), and writes them into
  the token-major output in place.  Only the state at each block start is kept.
* backward (``_chunks_bwd``): a reverse scan over the blocks differentiates
  ``_block`` (the same rule with the outputs batched over the block after the
  loop, the form whose VJP is cheaper) on each block from its saved start
  state, i.e. what ``jax.checkpoint`` around each block would do: backward
  memory is one state per block plus one block's activations.

On the 2-core CPU (docs/notes/benchmark-history.md) blocks are 2.5x faster forward and 2x
faster backward than one scan over all chunks with batched pre- and
post-processing, and this split forward is 1.3x faster than the
autodiff-friendly block with whole-sequence transposes.

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

import functools

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


def error_coefs(spec: MemorySpec) -> tuple[float, float]:
    """(c, s) of the step errors E = c K M_0^T + s V (module docstring)."""
    l2 = spec.objective == "l2"
    return (2.0 if l2 else 0.0) + (1.0 if spec.dgd else 0.0), (-2.0 if l2 else -1.0)


def last_tokens(c: int, t_real: int, first: int, n: int) -> tuple[int, ...] | None:
    """The last real token of chunks ``first .. n - 1`` (static), None when all of
    the ``n`` chunks are full."""
    if t_real >= n * c:
        return None
    return tuple(min(c, t_real - i * c) - 1 for i in range(first, n))


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

    Returns ``e0`` (the errors at M = 0; None when ``x`` has no ``v``), the
    gate matrix ``gate`` G ``[S, B, H, C, C]``, the per-token output
    coefficients ``beta`` and ``f`` (None without momentum), the per-token
    weights of the two state updates ``w_g`` = G[end] and ``w_h`` = Le[end]
    theta (None without momentum), and each chunk's end coefficients
    ``end_beta``, ``end_f``, ``end_m`` ``[S, B, H]`` (module docstring).
    ``last``: each chunk's last real token (static), None when every chunk is
    full.
    """
    eta, alpha = x["eta"], x["alpha"]
    log_eta, log_a = log_gates(eta, alpha)
    if not spec.weight_decay:
        log_a = jnp.zeros_like(alpha)
    beta = jnp.exp(prefix_sums(log_a))
    la = gate_products(log_a)
    e0 = None if "v" not in x else error_coefs(spec)[1] * x["v"]
    terms = {"e0": e0, "beta": beta, "end_beta": _last_index(beta, last)}
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


def _cut(x: jax.Array, start, size: int) -> jax.Array:
    """Tokens ``start .. start + size`` (``start`` may be traced) of ``[B, T, ...]``."""
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _chunk_major(x: jax.Array, c: int) -> jax.Array:
    """``[B, S * C, H, ...]`` -> ``[S, B, H, C, ...]``."""
    x = x.reshape((x.shape[0], -1, c) + x.shape[2:])
    return jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim)))


def _token_major(x: jax.Array) -> jax.Array:
    """``[S, B, H, C, ...]`` -> ``[B, S * C, H, ...]``."""
    x = jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim)))
    return x.reshape((x.shape[0], -1) + x.shape[3:])


def _block_forward(spec: MemorySpec, coef: float, state, xs: dict, start, n_chunks: int,
                   last: tuple[int, ...] | None, y_all: jax.Array):
    """``_block``'s results, computed for speed rather than for differentiation.

    Runs the ``n_chunks`` chunks from token ``start`` (traced or static) of the
    token-major ``xs`` (``[B, T, H, ...]``) from ``state`` = (M^T, S^T) and writes
    their outputs into ``y_all`` ``[B, T, H, d_v]``; returns (state, y_all).
    The gate terms are batched over the block; q, k and v are cut and transposed
    one chunk at a time, in cache, and each chunk's outputs come from the state
    inside the chunk loop (Y = diag(beta) Q M_0^T + diag(f) Q S_0^T - ((Q K^T) * G)
    E, with Q [M_0 | S_0]^T one GEMM), so nothing is stacked or sliced twice.
    """
    c = spec.chunk_size
    gates = {name: _chunk_major(_cut(xs[name], start, n_chunks * c), c)
             for name in ("theta", "eta", "alpha")}                # [S, B, H, C]
    terms = chunk_terms(spec, gates, last)
    weights = ("w_g", "w_h") if spec.momentum else ("w_g",)
    e_scale = error_coefs(spec)[1]

    def chunk(i, carry):
        (w_t, s_t), y_all = carry
        term = {name: x[i] for name, x in terms.items() if x is not None}
        offset = start + i * c
        q_c, k_c, v_c = (jnp.swapaxes(_cut(xs[name], offset, c), 1, 2)    # [B, H, C, d]
                         for name in ("q", "k", "v"))
        k_t = jnp.swapaxes(k_c, -1, -2)
        err = e_scale * v_c + coef * _mm(k_c, w_t) if coef else e_scale * v_c
        err = clip_errors(err, jnp.sum(k_c * k_c, -1) if spec.grad_clip > 0 else None,
                          spec.grad_clip)
        steps = _mm(k_t, jnp.concatenate([term[w][..., None] * err for w in weights], -1))
        scores = _mm(q_c, k_t) * term["gate"]
        d_v = err.shape[-1]
        if spec.momentum:
            q_ws = _mm(q_c, jnp.concatenate([w_t, s_t], axis=-1))   # Q [M_0 | S_0]^T
            y = (term["beta"][..., None] * q_ws[..., :d_v] - _mm(scores, err)
                 + term["f"][..., None] * q_ws[..., d_v:])
            state = (term["end_beta"][..., None, None] * w_t
                     + term["end_f"][..., None, None] * s_t - steps[..., :d_v],
                     term["end_m"][..., None, None] * s_t - steps[..., d_v:])
        else:
            y = term["beta"][..., None] * _mm(q_c, w_t) - _mm(scores, err)
            state = (term["end_beta"][..., None, None] * w_t - steps, s_t)
        y_all = jax.lax.dynamic_update_slice_in_dim(y_all, jnp.swapaxes(y, 1, 2), offset,
                                                    axis=1)
        return state, y_all

    if n_chunks > _MAX_UNROLL:
        return jax.lax.fori_loop(0, n_chunks, chunk, (state, y_all))
    carry = (state, y_all)
    for i in range(n_chunks):
        carry = chunk(i, carry)
    return carry


def linear_chunked(spec: MemorySpec, w0: jax.Array, s0: jax.Array, q, k, v, theta, eta,
                   alpha, t_real: int):
    """Chunked linear memory on token-major inputs (``api.apply_memory``).

    Args:
      w0, s0: ``[B, H, d_v, d_k]`` state.  q, k: ``[B, T, H, d_k]``;
        v: ``[B, T, H, d_v]``; gates ``[B, T, H]``; T a multiple of
        ``spec.chunk_size``.  ``t_real``: number of real tokens (static); the
        tokens after it are padding: the state is carried from each chunk's
        last real token.

    Returns:
      y ``[B, T, H, d_v]`` and the state (M, S) after token ``t_real``.
    """
    if q.shape[1] % spec.chunk_size:
        raise ValueError(f"linear_chunked: T = {q.shape[1]} is not a multiple of the chunk "
                         f"size {spec.chunk_size}; pad the inputs (api.apply_memory does)")
    if q.shape[1] == 0:      # an empty segment: no outputs, the state unchanged
        return jnp.zeros(v.shape, jnp.float32), (w0, s0)
    xs = {"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha}
    state = (jnp.swapaxes(w0, -1, -2), jnp.swapaxes(s0, -1, -2))
    y, (w_t, s_t) = _chunks(spec, t_real, state, xs)
    return y, (jnp.swapaxes(w_t, -1, -2), jnp.swapaxes(s_t, -1, -2))


class _Blocks:
    """How T tokens split into blocks of ``spec.remat_every`` chunks: the scan runs
    over the ``count`` blocks whose chunks are all full; the chunks left over
    (up to a block, the last maybe partial) form one more block, the tail."""

    def __init__(self, spec: MemorySpec, t: int, t_real: int):
        c = spec.chunk_size
        n = t // c
        self.coef = error_coefs(spec)[0]
        self.size = min(spec.remat_every, n)
        self.count = (t_real // c) // self.size
        self.span = self.size * c                      # tokens per block
        self.split = self.count * self.span            # tokens in the scanned blocks
        self.tail_chunks = n - self.split // c
        self.tail_last = last_tokens(c, t_real, self.split // c, n)


def _forward(spec: MemorySpec, t_real: int, state, xs: dict):
    """y, the final state, and the state at the start of every block (and of the tail)."""
    blocks = _Blocks(spec, xs["q"].shape[1], t_real)
    y_all = jnp.zeros(xs["v"].shape, jnp.float32)
    starts = {}
    if blocks.count:
        def body(carry, i):
            start, y_all = carry
            end, y_all = _block_forward(spec, blocks.coef, start, xs, i * blocks.span,
                                        blocks.size, None, y_all)
            return (end, y_all), start
        (state, y_all), starts["blocks"] = jax.lax.scan(body, (state, y_all),
                                                        jnp.arange(blocks.count))
    if blocks.tail_chunks:
        starts["tail"] = state
        state, y_all = _block_forward(spec, blocks.coef, state, xs, blocks.split,
                                      blocks.tail_chunks, blocks.tail_last, y_all)
    return y_all, state, starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunks(spec: MemorySpec, t_real: int, state, xs: dict):
    """(y, final state) of the chunked rule on token-major ``xs`` from ``state`` =
    (M^T, S^T): forward ``_block_forward``, backward the VJP of ``_block`` per block."""
    y, state, _ = _forward(spec, t_real, state, xs)
    return y, state


def _chunks_fwd(spec, t_real, state, xs):
    y, end, starts = _forward(spec, t_real, state, xs)
    return (y, end), (starts, xs)


def _chunks_bwd(spec, t_real, residuals, cotangents):
    """Reverse over the blocks: each block's forward is recomputed from its saved
    start state by ``_block`` and differentiated (``jax.vjp``), on the block cut
    from the token-major inputs and made chunk-major in cache; the input
    cotangents are written block by block into token-major buffers."""
    starts, xs = residuals
    d_y, d_state = cotangents
    c = spec.chunk_size
    blocks = _Blocks(spec, xs["q"].shape[1], t_real)

    def block_vjp(start, x_tokens, d_y_tokens, d_end, last):
        x = {name: _chunk_major(g, c) for name, g in x_tokens.items()}
        _, vjp = jax.vjp(lambda st, x_: _block(spec, blocks.coef, st, x_, last), start, x)
        d_start, d_x = vjp((d_end, _chunk_major(d_y_tokens, c)))
        return d_start, {name: _token_major(g) for name, g in d_x.items()}

    d_xs = jax.tree.map(jnp.zeros_like, xs)
    if blocks.tail_chunks:
        d_state, d_tail = block_vjp(starts["tail"],
                                    {name: x[:, blocks.split:] for name, x in xs.items()},
                                    d_y[:, blocks.split:], d_state, blocks.tail_last)
        d_xs = {name: d_xs[name].at[:, blocks.split:].set(g) for name, g in d_tail.items()}
    if blocks.count:
        def body(carry, inputs):
            d_end, d_xs = carry
            start, i = inputs
            offset = i * blocks.span
            d_start, d_x = block_vjp(start, {name: _cut(x, offset, blocks.span)
                                             for name, x in xs.items()},
                                     _cut(d_y, offset, blocks.span), d_end, None)
            d_xs = {name: jax.lax.dynamic_update_slice_in_dim(d_xs[name], g, offset, axis=1)
                    for name, g in d_x.items()}
            return (d_start, d_xs), None
        (d_state, d_xs), _ = jax.lax.scan(body, (d_state, d_xs),
                                          (starts["blocks"], jnp.arange(blocks.count)),
                                          reverse=True)
    return d_state, d_xs


_chunks.defvjp(_chunks_fwd, _chunks_bwd)


def linear_kernel(spec: MemorySpec, w0: jax.Array, s0: jax.Array, q, k, v, theta, eta,
                  alpha, t_real: int, interpret: bool | None = None):
    """``linear_chunked`` with the chunk recurrence in the Pallas kernel
    (``kernels/linear_memory.py``): the state-independent terms of every chunk
    are computed here at once (``chunk_terms``), the recurrence over chunks runs
    in the kernel with the state resident on chip.  Same arguments and results."""
    from nl_jax_kernels.linear_memory import BACKENDS, ROWS, chunk_recurrence

    backend = jax.default_backend()
    if interpret is None and backend not in BACKENDS:
        raise ConfigError(f"memory path='kernel' runs on TPUs (Mosaic) and CUDA GPUs "
                          f"(Triton), not on {backend}; use path='chunked' (e.g. "
                          f"--config.model.memory.path=chunked)")
    n, _, _, c, _ = q.shape
    if n == 0:
        return jnp.zeros(v.shape, jnp.float32), (w0, s0)
    coef = error_coefs(spec)[0]
    last = last_tokens(c, t_real, 0, n)
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
                               grad_clip=spec.grad_clip, interpret=interpret,
                               save_every=spec.remat_every)
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
