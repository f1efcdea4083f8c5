"""Pallas TPU kernel for the chunk recurrence of the linear memory, with its reference.

The chunked dual form of the linear memory (``nl_jax/memory/linear_chunked.py``,
NL_MATH.md section 1) splits into state-independent quantities of every chunk
(gate matrices, per-token weights: batched, computed by XLA) and a recurrence
over chunks that carries the state.  This module holds the recurrence:

    E   = clip(E0 + coef K M^T)                                  (step errors)
    Y   = beta * (Q M^T) + f * (Q S^T) - ((Q K^T) * G) E         (outputs)
    M^T <- end_beta M^T + end_f S^T - K^T (w_g * E)
    S^T <- end_m S^T - K^T (w_h * E)

for every chunk in order (Titans Eq. 13-14 and 16, NL Eq. 57 with DGD folded
into ``coef``; without momentum S stays 0 and f, w_h, end_f are unused).

Layout (chunk-major, fp32): q, k ``[N, B, H, C, d_k]``; e0 ``[N, B, H, C, d_v]``;
gate G ``[N, B, H, C, C]``; rows ``[N, B, H, C, 8]`` with the columns of
``ROW_COLUMNS`` (the three end_* columns repeat the chunk's scalar in every
row); mt0, st0 ``[B, H, d_k, d_v]`` (M^T, S^T at the start).

Three pieces, as in recurrentgemma's kernels:

* ``chunk_step`` / ``reference``: the pure-jnp recurrence (a ``lax.scan`` over
  chunks, each step rematerialised so its backward keeps one state per chunk);
* ``_kernel``: the Pallas body, grid (B, H, N) with the chunk axis sequential
  and the state resident in VMEM across it, so the state never goes back to
  HBM between chunks and no layout pass is needed around it;
* ``chunk_recurrence``: the dispatch function, a ``custom_vjp`` whose forward
  is the kernel (which then also writes every chunk's start state) and whose
  backward is a reverse ``lax.scan`` of ``chunk_step``'s VJP at those states
  (XLA; a backward kernel is future work).  On the CPU the kernel runs in
  Pallas interpret mode (tests); on a GPU it is refused (Mosaic TPU only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

ROW_COLUMNS = ("beta", "f", "w_g", "w_h", "k_sq", "end_beta", "end_f", "end_m")
_HI = jax.lax.Precision.HIGHEST


def _dot(a, b, contract=((1,), (0,))):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def chunk_step(q, k, e0, gate, rows, mt, st, *, coef: float, momentum: bool,
               grad_clip: float):
    """One chunk of one sequence: q, k ``[C, d_k]``, e0 ``[C, d_v]``, gate ``[C, C]``,
    rows ``[C, 8]``, mt, st ``[d_k, d_v]``; returns (y ``[C, d_v]``, mt, st) after it."""
    col = {name: rows[:, i:i + 1] for i, name in enumerate(ROW_COLUMNS)}
    err = e0 + coef * _dot(k, mt) if coef else e0
    if grad_clip > 0:        # token j's direction E_j k_j^T has norm |E_j| |k_j|
        sq = jnp.sum(err * err, axis=1, keepdims=True) * col["k_sq"]
        err = err * (grad_clip / jnp.maximum(jnp.sqrt(sq + 1e-12), grad_clip))
    scores = _dot(q, k, ((1,), (1,))) * gate
    y = col["beta"] * _dot(q, mt) - _dot(scores, err)
    k_t = functools.partial(_dot, k, contract=((0,), (0,)))          # K^T x
    end = {name: col[name][0:1] for name in ("end_beta", "end_f", "end_m")}
    if momentum:
        y = y + col["f"] * _dot(q, st)
        mt_new = end["end_beta"] * mt + end["end_f"] * st - k_t(col["w_g"] * err)
        st_new = end["end_m"] * st - k_t(col["w_h"] * err)
        return y, mt_new, st_new
    return y, end["end_beta"] * mt - k_t(col["w_g"] * err), st


def reference(q, k, e0, gate, rows, mt0, st0, *, coef: float, momentum: bool,
              grad_clip: float):
    """The recurrence in jnp: ``lax.scan`` over chunks of ``chunk_step`` batched over
    (B, H).  Returns (y ``[N, B, H, C, d_v]``, mt, st)."""
    step = functools.partial(chunk_step, coef=coef, momentum=momentum, grad_clip=grad_clip)
    batched = jax.vmap(jax.vmap(step))        # over B, then H

    @jax.checkpoint
    def body(state, xs):
        y, mt, st = batched(*xs, *state)
        return (mt, st), y

    (mt, st), y = jax.lax.scan(body, (mt0, st0), (q, k, e0, gate, rows))
    return y, mt, st


def _kernel(q_ref, k_ref, e0_ref, gate_ref, rows_ref, mt0_ref, st0_ref, y_ref, mt_ref,
            st_ref, *rest, coef, momentum, grad_clip, save_states):
    if save_states:             # chunk-start states for the backward pass
        mt_start_ref, st_start_ref, mt_scratch, st_scratch = rest
    else:
        mt_scratch, st_scratch = rest
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _():
        mt_scratch[...] = mt0_ref[...]
        st_scratch[...] = st0_ref[...]

    mt0, st0 = mt_scratch[...], st_scratch[...]
    if save_states:
        mt_start_ref[...] = mt0
        st_start_ref[...] = st0
    y, mt, st = chunk_step(q_ref[...], k_ref[...], e0_ref[...], gate_ref[...],
                           rows_ref[...], mt0, st0,
                           coef=coef, momentum=momentum, grad_clip=grad_clip)
    y_ref[...] = y
    mt_scratch[...] = mt
    st_scratch[...] = st

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _():
        mt_ref[...] = mt
        st_ref[...] = st


def pallas_recurrence(q, k, e0, gate, rows, mt0, st0, *, coef: float, momentum: bool,
                      grad_clip: float, interpret: bool = False, save_states: bool = False):
    """The recurrence as one ``pallas_call``: (y, mt, st), and with ``save_states``
    also every chunk's start state (M^T, S^T) ``[N, B, H, d_k, d_v]`` each."""
    n, b, h, c, d_k = q.shape
    d_v = e0.shape[-1]

    def per_chunk(*shape):
        return pl.BlockSpec((None, None, None) + shape,
                            lambda bi, hi, ni: (ni, bi, hi) + (0,) * len(shape))

    state = pl.BlockSpec((None, None, d_k, d_v), lambda bi, hi, ni: (bi, hi, 0, 0))
    state_shape = jax.ShapeDtypeStruct((b, h, d_k, d_v), jnp.float32)
    out_specs = [per_chunk(c, d_v), state, state]
    out_shape = [jax.ShapeDtypeStruct((n, b, h, c, d_v), jnp.float32), state_shape,
                 state_shape]
    if save_states:
        out_specs += [per_chunk(d_k, d_v)] * 2
        out_shape += [jax.ShapeDtypeStruct((n, b, h, d_k, d_v), jnp.float32)] * 2
    kernel = functools.partial(_kernel, coef=coef, momentum=momentum, grad_clip=grad_clip,
                               save_states=save_states)
    return pl.pallas_call(
        kernel,
        grid=(b, h, n),
        in_specs=[per_chunk(c, d_k), per_chunk(c, d_k), per_chunk(c, d_v), per_chunk(c, c),
                  per_chunk(c, len(ROW_COLUMNS)), state, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((d_k, d_v), jnp.float32),
                        pltpu.VMEM((d_k, d_v), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="linear_memory_chunks",
    )(q, k, e0, gate, rows, mt0, st0)


def _for_platform(args, interpret: bool | None, **kwargs):
    """``pallas_recurrence`` on ``args``; ``interpret`` None: Pallas interpret mode
    when the program is compiled for the CPU, Mosaic when for a TPU (decided at
    lowering, so an ahead-of-time compile for a TPU topology from a CPU host gets
    the kernel)."""
    if interpret is not None:
        return tuple(pallas_recurrence(*args, interpret=interpret, **kwargs))
    return tuple(jax.lax.platform_dependent(
        *args, cpu=functools.partial(pallas_recurrence, interpret=True, **kwargs),
        tpu=functools.partial(pallas_recurrence, interpret=False, **kwargs)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _recurrence(q, k, e0, gate, rows, mt0, st0, coef, momentum, grad_clip, interpret):
    return _for_platform((q, k, e0, gate, rows, mt0, st0), interpret, coef=coef,
                         momentum=momentum, grad_clip=grad_clip)


def _recurrence_fwd(q, k, e0, gate, rows, mt0, st0, coef, momentum, grad_clip, interpret):
    y, mt, st, mt_starts, st_starts = _for_platform(
        (q, k, e0, gate, rows, mt0, st0), interpret, coef=coef, momentum=momentum,
        grad_clip=grad_clip, save_states=True)
    return (y, mt, st), (q, k, e0, gate, rows, mt_starts, st_starts)


def _recurrence_bwd(coef, momentum, grad_clip, interpret, residuals, cotangents):
    """A reverse scan over chunks of the VJP of ``chunk_step`` at the saved
    chunk-start states: no forward recurrence is recomputed, and memory stays
    one state per chunk."""
    del interpret
    step = jax.vmap(jax.vmap(functools.partial(
        chunk_step, coef=coef, momentum=momentum, grad_clip=grad_clip)))
    ct_y, ct_mt, ct_st = cotangents

    def body(carry, xs):
        *chunk_inputs, ct_y_n = xs
        _, vjp = jax.vjp(step, *chunk_inputs)
        grads = vjp((ct_y_n, *carry))
        return grads[5:], grads[:5]

    (ct_mt0, ct_st0), grads = jax.lax.scan(body, (ct_mt, ct_st), (*residuals, ct_y),
                                           reverse=True)
    return (*grads, ct_mt0, ct_st0)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def chunk_recurrence(q, k, e0, gate, rows, mt0, st0, *, coef: float, momentum: bool,
                     grad_clip: float = 0.0, interpret: bool | None = None):
    """Dispatch: the Pallas kernel forward, ``chunk_step``'s VJP chunk by chunk backward.

    ``interpret``: None picks, by the platform the program is compiled for,
    Pallas interpret mode on the CPU (for tests; slow) and the Mosaic kernel on
    a TPU.  Raises ValueError when the default backend is a GPU.  Returns (y,
    mt, st) as ``reference``.
    """
    backend = jax.default_backend()
    if interpret is None and backend not in ("cpu", "tpu"):
        raise ValueError(f"the linear memory kernel is a Mosaic TPU kernel; on {backend} "
                         "use memory path='chunked'")
    if q.shape[:4] != gate.shape[:4] or rows.shape[-1] != len(ROW_COLUMNS):
        raise ValueError(f"chunk_recurrence: gate {gate.shape} and rows {rows.shape} must be "
                         f"[N, B, H, C, C] and [N, B, H, C, {len(ROW_COLUMNS)}] for q "
                         f"{q.shape}")
    return _recurrence(q, k, e0, gate, rows, mt0, st0, float(coef), bool(momentum),
                       float(grad_clip), None if interpret is None else bool(interpret))
