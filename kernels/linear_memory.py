"""Pallas kernels (TPU and GPU) for the chunk recurrence of the linear memory, with its
reference.

The chunked dual form of the linear memory (``nl_jax/memory/linear_chunked.py``,
docs/equations.md section 1) splits into state-independent quantities of every chunk
(gate matrices, per-token weights: batched, computed by XLA) and a recurrence
over chunks that carries the state.  This module holds the recurrence:

    E   = clip(E0 + coef K M^T)                                  (step errors)
    Y   = beta * (Q M^T) + f * (Q S^T) - ((Q K^T) * G) E         (outputs)
    M^T <- end_beta M^T + end_f S^T - K^T (w_g * E)
    S^T <- end_m S^T - K^T (w_h * E)

for every chunk in order (Titans Eq. 13-14 and 16, NL Eq. 57 with DGD folded
into ``coef``).  Without momentum there is no S: the terms with f, w_h, end_f
and end_m drop out and the kernel carries M alone.

Layout (chunk-major, fp32): q, k ``[N, B, H, C, d_k]``; e0 ``[N, B, H, C, d_v]``;
gate G ``[N, B, H, C, C]``; rows ``[N, B, H, 8, C]``, one row per name of
``ROWS`` (tokens on the lane axis; the three end_* rows repeat the chunk's
scalar); mt0, st0 ``[B, H, d_k, d_v]`` (M^T, S^T at the start).

The pieces, as in recurrentgemma's kernels:

* ``chunk_step`` / ``reference``: the pure-jnp recurrence (a ``lax.scan`` over
  chunks, each step rematerialised so its backward keeps one state per chunk);
  ``chunk_maths`` is its body with the rows already split, shared by all;
* ``_kernel``: the Mosaic (TPU) body, grid (B, H, N) with the chunk axis
  sequential and the state resident in VMEM across it, so the state never
  goes back to HBM between chunks and no layout pass is needed around it;
* ``_triton_kernel``: the Triton (GPU) body, grid (B, H), one program looping
  over the chunks with the state in registers; C, d_k and d_v are zero-padded
  to Triton tiles (powers of two, at least 16), which changes no result;
* ``chunk_recurrence``: the dispatch function, a ``custom_vjp`` whose forward
  is the kernel (which then also writes every chunk's start state) and whose
  backward is a reverse ``lax.scan`` of ``chunk_step``'s VJP at those states
  (XLA; a backward kernel is future work).  The body is chosen at lowering
  by platform: Mosaic on a TPU, Triton on a CUDA GPU, and on the CPU the
  Mosaic body in Pallas interpret mode (tests; ``body="triton"`` interprets
  the GPU body there).  Other backends are refused.

Memory: for the backward the kernel keeps every chunk's start state (M and S:
2 d_k d_v floats per chunk and head), the XLA path one state per
``remat_every`` chunks plus a recomputation; the kernel path trades that
memory for not recomputing the recurrence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

BACKENDS = ("cpu", "tpu", "gpu")       # gpu: CUDA (Triton); the CPU interprets
ROWS = ("beta", "f", "w_g", "w_h", "k_sq", "end_beta", "end_f", "end_m")
_HI = jax.lax.Precision.HIGHEST


def _dot(a, b, contract=((1,), (0,))):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def chunk_step(q, k, e0, gate, rows, states, *, coef: float, momentum: bool,
               grad_clip: float):
    """One chunk of one sequence: q, k ``[C, d_k]``, e0 ``[C, d_v]``, gate ``[C, C]``,
    rows ``[8, C]``, states (M^T, S^T) with momentum, (M^T,) without, each
    ``[d_k, d_v]``; returns (y ``[C, d_v]``, the states after the chunk)."""
    cols = jnp.transpose(rows)                                   # [C, 8]: per-token columns
    col = {name: cols[:, i:i + 1] for i, name in enumerate(ROWS)}
    end = {name: col[name][0:1] for name in ("end_beta", "end_f", "end_m")}   # [1, 1]
    return chunk_maths(q, k, e0, gate, col, end, states, coef=coef, momentum=momentum,
                       grad_clip=grad_clip)


def chunk_maths(q, k, e0, gate, col, end, states, *, coef: float, momentum: bool,
                grad_clip: float):
    """``chunk_step`` with the rows already split: ``col`` maps each name of ``ROWS``
    to its ``[C, 1]`` column, ``end`` the three end_* names to their chunk scalar
    (any shape that broadcasts against ``[d_k, d_v]``).  Shared by the reference,
    the Mosaic body and the Triton body, which differ only in how they read rows."""
    mt = states[0]
    err = e0 + coef * _dot(k, mt) if coef else e0
    if grad_clip > 0:        # token j's direction E_j k_j^T has norm |E_j| |k_j|
        sq = jnp.sum(err * err, axis=1, keepdims=True) * col["k_sq"]
        err = err * (grad_clip / jnp.maximum(jnp.sqrt(sq + 1e-12), grad_clip))
    scores = _dot(q, k, ((1,), (1,))) * gate
    y = col["beta"] * _dot(q, mt) - _dot(scores, err)
    k_t = functools.partial(_dot, k, contract=((0,), (0,)))          # K^T x
    if not momentum:
        return y, (end["end_beta"] * mt - k_t(col["w_g"] * err),)
    st = states[1]
    y = y + col["f"] * _dot(q, st)
    mt_new = end["end_beta"] * mt + end["end_f"] * st - k_t(col["w_g"] * err)
    st_new = end["end_m"] * st - k_t(col["w_h"] * err)
    return y, (mt_new, st_new)


def reference(q, k, e0, gate, rows, states, *, coef: float, momentum: bool,
              grad_clip: float):
    """The recurrence in jnp: ``lax.scan`` over chunks of ``chunk_step`` batched over
    (B, H).  Returns (y ``[N, B, H, C, d_v]``, the final states)."""
    step = jax.vmap(jax.vmap(functools.partial(chunk_step, coef=coef, momentum=momentum,
                                               grad_clip=grad_clip)))   # over B, then H

    @jax.checkpoint
    def body(carry, xs):
        y, carry = step(*xs, carry)
        return carry, y

    final, y = jax.lax.scan(body, tuple(states), (q, k, e0, gate, rows))
    return y, final


def _kernel(*refs, n_states, coef, momentum, grad_clip, save_states):
    """refs: q, k, e0, gate, rows, the start states (inputs); y, the final states and,
    with ``save_states``, each chunk's start states (outputs); the VMEM states."""
    chunk_refs, refs = refs[:5], refs[5:]
    init_refs, y_ref, refs = refs[:n_states], refs[n_states], refs[n_states + 1:]
    final_refs, refs = refs[:n_states], refs[n_states:]
    start_refs = refs[:n_states] if save_states else ()
    scratch = refs[-n_states:]
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _():
        for vmem, init in zip(scratch, init_refs, strict=True):
            vmem[...] = init[...]

    states = tuple(vmem[...] for vmem in scratch)
    for out, value in zip(start_refs, states if save_states else (), strict=True):
        out[...] = value
    y, states = chunk_step(*(r[...] for r in chunk_refs), states, coef=coef,
                           momentum=momentum, grad_clip=grad_clip)
    y_ref[...] = y
    for vmem, value in zip(scratch, states, strict=True):
        vmem[...] = value

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _():
        for out, value in zip(final_refs, states, strict=True):
            out[...] = value


# Mosaic's default scoped-VMEM budget and the most this kernel asks for.  Checked by
# ahead-of-time compiles: with the raised limit head dim 512 compiles for v5e, v5p
# and v6e; v4's 16 MiB of VMEM cannot hold it (head dims <= 256 fit everywhere).
DEFAULT_SCOPED_VMEM = 16 * 2**20
MAX_SCOPED_VMEM = 100 * 2**20


def vmem_limit_bytes(c: int, d_k: int, d_v: int, n_states: int, save_states: bool
                     ) -> int | None:
    """A scoped-VMEM limit for one grid step, or None when the default fits.

    Estimate in fp32 words: the double-buffered chunk inputs and y, the state
    blocks (start, final, saved: double-buffered) and VMEM scratch, and the
    body's temporaries (a few state-sized and chunk-sized arrays), with 50%
    headroom.  Head dims up to 256 fit the default; 512 does not.
    """
    chunk_io = 2 * (2 * c * d_k + 2 * c * d_v + c * c + 8 * c)
    state = d_k * d_v
    blocks = n_states * state * (2 + 2 + (2 if save_states else 0) + 1)
    temps = 4 * state + 4 * c * max(d_k, d_v, c)
    need = int(1.5 * 4 * (chunk_io + blocks + temps))
    if need <= DEFAULT_SCOPED_VMEM:
        return None
    return min(need, MAX_SCOPED_VMEM)


def _layout(chunk_block, state_block, dims, n_states: int, save_states: bool):
    """(in_specs, out_specs, out_shape) of either body's ``pallas_call``.
    ``chunk_block(*shape)`` blocks a chunk-major ``[N, B, H, *shape]`` array,
    ``state_block`` a ``[B, H, d_k, d_v]`` state; dims (N, B, H, C, d_k, d_v)."""
    n, b, h, c, d_k, d_v = dims
    in_specs = [chunk_block(c, d_k), chunk_block(c, d_k), chunk_block(c, d_v),
                chunk_block(c, c), chunk_block(len(ROWS), c)] + [state_block] * n_states
    out_specs = [chunk_block(c, d_v)] + [state_block] * n_states
    out_shape = ([jax.ShapeDtypeStruct((n, b, h, c, d_v), jnp.float32)]
                 + [jax.ShapeDtypeStruct((b, h, d_k, d_v), jnp.float32)] * n_states)
    if save_states:
        out_specs += [chunk_block(d_k, d_v)] * n_states
        out_shape += [jax.ShapeDtypeStruct((n, b, h, d_k, d_v), jnp.float32)] * n_states
    return in_specs, out_specs, out_shape


def pallas_recurrence(q, k, e0, gate, rows, states, *, coef: float, momentum: bool,
                      grad_clip: float, interpret: bool = False, save_states: bool = False):
    """The recurrence as one ``pallas_call``: (y, final states), and with
    ``save_states`` also each chunk's start states ``[N, B, H, d_k, d_v]``."""
    n, b, h, c, d_k = q.shape
    d_v = e0.shape[-1]
    n_states = len(states)

    def per_chunk(*shape):
        return pl.BlockSpec((None, None, None) + shape,
                            lambda bi, hi, ni: (ni, bi, hi) + (0,) * len(shape))

    state = pl.BlockSpec((None, None, d_k, d_v), lambda bi, hi, ni: (bi, hi, 0, 0))
    in_specs, out_specs, out_shape = _layout(per_chunk, state, (n, b, h, c, d_k, d_v),
                                             n_states, save_states)
    kernel = functools.partial(_kernel, n_states=n_states, coef=coef, momentum=momentum,
                               grad_clip=grad_clip, save_states=save_states)
    out = pl.pallas_call(
        kernel,
        grid=(b, h, n),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((d_k, d_v), jnp.float32)] * n_states,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes(c, d_k, d_v, n_states, save_states)),
        interpret=interpret,
        name="linear_memory_chunks",
    )(q, k, e0, gate, rows, *states)
    y, final, starts = out[0], tuple(out[1:1 + n_states]), tuple(out[1 + n_states:])
    return (y, final, starts) if save_states else (y, final)


def _padded(n: int) -> int:
    """The Triton tile size for an axis of n: a power of two, at least 16 (the
    smallest tile ``tl.dot`` takes)."""
    return max(16, 1 << (n - 1).bit_length())


def _triton_kernel(*refs, n_chunks, n_states, coef, momentum, grad_clip, save_states):
    """refs as in ``_kernel`` without the scratch; each block holds every chunk of one
    (batch, head).  One program loops over the chunks with the state in registers
    (Triton programs run in parallel, so the chunk axis cannot be a grid axis)."""
    (q_ref, k_ref, e0_ref, gate_ref, rows_ref), refs = refs[:5], refs[5:]
    init_refs, y_ref, refs = refs[:n_states], refs[n_states], refs[n_states + 1:]
    final_refs, start_refs = refs[:n_states], refs[n_states:]
    names = ["beta", "w_g"] + (["f", "w_h"] if momentum else []) + (
        ["k_sq"] if grad_clip > 0 else [])

    def body(i, states):
        for out, value in zip(start_refs, states if save_states else (), strict=True):
            out[i] = value
        col = {name: rows_ref[i, ROWS.index(name)][:, None] for name in names}
        end = {name: rows_ref[i, ROWS.index(name), 0] for name in ("end_beta", "end_f",
                                                                    "end_m")}
        y, states = chunk_maths(q_ref[i], k_ref[i], e0_ref[i], gate_ref[i], col, end, states,
                                coef=coef, momentum=momentum, grad_clip=grad_clip)
        y_ref[i] = y
        return states

    states = jax.lax.fori_loop(0, n_chunks, body, tuple(r[...] for r in init_refs))
    for out, value in zip(final_refs, states, strict=True):
        out[...] = value


def triton_recurrence(q, k, e0, gate, rows, states, *, coef: float, momentum: bool,
                      grad_clip: float, interpret: bool = False, save_states: bool = False):
    """``pallas_recurrence`` for GPUs (Pallas Triton): grid (B, H), one program per
    sequence and head looping over the chunks.  C, d_k and d_v are zero-padded to
    Triton tiles (``_padded``); padded tokens carry zero rows, keys and errors, so
    they add nothing to the state, and the padding is cut from every output."""
    n, b, h, c, d_k = q.shape
    d_v = e0.shape[-1]
    n_states = len(states)
    cp, kp, vp = _padded(c), _padded(d_k), _padded(d_v)

    def pad(x, *widths):         # zero-pad the trailing len(widths) axes at their ends
        return jnp.pad(x, [(0, 0)] * (x.ndim - len(widths)) + [(0, w) for w in widths])

    q, k = pad(q, cp - c, kp - d_k), pad(k, cp - c, kp - d_k)
    e0, gate, rows = pad(e0, cp - c, vp - d_v), pad(gate, cp - c, cp - c), pad(rows, 0, cp - c)
    states = tuple(pad(s, kp - d_k, vp - d_v) for s in states)

    def every_chunk(*shape):
        return pl.BlockSpec((n, None, None) + shape,
                            lambda bi, hi: (0, bi, hi) + (0,) * len(shape))

    state = pl.BlockSpec((None, None, kp, vp), lambda bi, hi: (bi, hi, 0, 0))
    in_specs, out_specs, out_shape = _layout(every_chunk, state, (n, b, h, cp, kp, vp),
                                             n_states, save_states)
    kernel = functools.partial(_triton_kernel, n_chunks=n, n_states=n_states, coef=coef,
                               momentum=momentum, grad_clip=grad_clip,
                               save_states=save_states)
    out = pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltr.CompilerParams(num_warps=4 if kp * vp <= 64 * 64 else 8,
                                            num_stages=1),
        interpret=interpret,
        name="linear_memory_chunks_gpu",
    )(q, k, e0, gate, rows, *states)
    y = out[0][..., :c, :d_v]
    final, starts = out[1:1 + n_states], out[1 + n_states:]
    final = tuple(s[..., :d_k, :d_v] for s in final)
    if save_states:
        return y, final, tuple(s[..., :d_k, :d_v] for s in starts)
    return y, final


BODIES = {"mosaic": pallas_recurrence, "triton": triton_recurrence}


def _for_platform(args, interpret: bool | None, body: str, **kwargs):
    """The recurrence on ``args`` by the platform the program is compiled for
    (decided at lowering, so an ahead-of-time compile for a TPU topology from a
    CPU host gets the Mosaic kernel): ``body="auto"`` runs Mosaic on a TPU, Triton
    on a CUDA GPU and the Mosaic body in Pallas interpret mode on the CPU; a named
    body runs on every platform, compiled, or interpreted on the CPU.  An explicit
    ``interpret`` applies everywhere (``"auto"`` then means Mosaic)."""
    if body == "auto" and interpret is not None:
        body = "mosaic"
    if body != "auto":
        fn = BODIES[body]
        if interpret is not None:
            return fn(*args, interpret=interpret, **kwargs)
        return jax.lax.platform_dependent(
            *args, cpu=functools.partial(fn, interpret=True, **kwargs),
            default=functools.partial(fn, interpret=False, **kwargs))
    return jax.lax.platform_dependent(
        *args, cpu=functools.partial(pallas_recurrence, interpret=True, **kwargs),
        tpu=functools.partial(pallas_recurrence, interpret=False, **kwargs),
        cuda=functools.partial(triton_recurrence, interpret=False, **kwargs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _recurrence(q, k, e0, gate, rows, states, coef, momentum, grad_clip, interpret, body):
    return _for_platform((q, k, e0, gate, rows, states), interpret, body, coef=coef,
                         momentum=momentum, grad_clip=grad_clip)


def _recurrence_fwd(q, k, e0, gate, rows, states, coef, momentum, grad_clip, interpret,
                    body):
    y, final, starts = _for_platform((q, k, e0, gate, rows, states), interpret, body,
                                     coef=coef, momentum=momentum, grad_clip=grad_clip,
                                     save_states=True)
    return (y, final), (q, k, e0, gate, rows, starts)


def _recurrence_bwd(coef, momentum, grad_clip, interpret, body, residuals, cotangents):
    """A reverse scan over chunks of the VJP of ``chunk_step`` at the saved
    chunk-start states: no forward recurrence is recomputed."""
    del interpret, body
    step = jax.vmap(jax.vmap(functools.partial(
        chunk_step, coef=coef, momentum=momentum, grad_clip=grad_clip)))
    ct_y, ct_final = cotangents

    def body(ct_states, xs):
        *chunk_inputs, ct_y_n = xs
        _, vjp = jax.vjp(step, *chunk_inputs)
        *ct_chunk, ct_states = vjp((ct_y_n, ct_states))
        return ct_states, tuple(ct_chunk)

    ct_states, ct_chunks = jax.lax.scan(body, ct_final, (*residuals, ct_y), reverse=True)
    return (*ct_chunks, ct_states)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def chunk_recurrence(q, k, e0, gate, rows, mt0, st0=None, *, coef: float, momentum: bool,
                     grad_clip: float = 0.0, interpret: bool | None = None,
                     body: str = "auto"):
    """Dispatch: the Pallas kernel forward, ``chunk_step``'s VJP chunk by chunk backward.

    ``st0`` is required with ``momentum`` and ignored without (then returned as
    is).  ``interpret``: None picks, by the platform the program is compiled
    for, Pallas interpret mode on the CPU (for tests; slow) and the compiled
    kernel on a TPU (Mosaic) or a CUDA GPU (Triton); ``body`` forces one of
    ``BODIES`` (tests run the Triton body in interpret mode on the CPU).  Raises
    ValueError on other backends, and for shapes or dtypes other than the
    module docstring's.  Returns (y, mt, st).
    """
    backend = jax.default_backend()
    if interpret is None and backend not in BACKENDS:
        raise ValueError(f"the linear memory kernel runs on {', '.join(BACKENDS)}, not on "
                         f"{backend}; use memory path='chunked'")
    if body not in ("auto", *BODIES):
        raise ValueError(f"chunk_recurrence: body={body!r}; use 'auto' or one of "
                         f"{sorted(BODIES)}")
    n, b, h, c, _ = q.shape
    if gate.shape != (n, b, h, c, c) or rows.shape != (n, b, h, len(ROWS), c):
        raise ValueError(f"chunk_recurrence: gate {gate.shape} and rows {rows.shape} must be "
                         f"{(n, b, h, c, c)} and {(n, b, h, len(ROWS), c)} for q {q.shape}")
    if momentum and st0 is None:
        raise ValueError("chunk_recurrence: momentum=True needs st0")
    states = (mt0, st0) if momentum else (mt0,)
    arrays = {"q": q, "k": k, "e0": e0, "gate": gate, "rows": rows, "mt0": mt0, "st0": st0}
    wrong = {name: str(x.dtype) for name, x in arrays.items()
             if x is not None and x.dtype != jnp.float32 and (name != "st0" or momentum)}
    if wrong:
        raise ValueError(f"chunk_recurrence takes float32 arrays, got {wrong}; cast them "
                         "first (the state and its updates are fp32)")
    y, final = _recurrence(q, k, e0, gate, rows, states, float(coef), bool(momentum),
                           float(grad_clip), None if interpret is None else bool(interpret),
                           body)
    return y, final[0], (final[1] if momentum else st0)
