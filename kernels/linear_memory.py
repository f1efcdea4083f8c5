"""The linear memory's chunk recurrence (Titans, NL Eq. 57) as a level of the
chunk-scan kernels (``kernels/chunk_scan.py``), with its reference.

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

* ``chunk_step`` / ``chunk_maths``: one chunk of one sequence in jnp, the
  ``step`` that ``chunk_scan`` runs (forward and backward kernels: Mosaic on a
  TPU with the state in VMEM, Triton on a CUDA GPU, interpret mode on the CPU);
* ``reference``: the recurrence in jnp (``chunk_scan.reference``);
* ``chunk_recurrence``: the dispatch function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nl_jax_kernels import chunk_scan
from nl_jax_kernels.chunk_scan import BACKENDS, BODIES

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


def _step(states, chunk, *, coef: float, momentum: bool, grad_clip: float):
    """``chunk_maths`` in ``chunk_scan``'s convention, on the rows as named vectors and
    scalars (``_named_rows``: a kernel body slices no values): (new states, y)."""
    q, k, e0, gate, rows, ends = chunk
    col = {name: row[:, None] for name, row in rows.items()}
    y, new = chunk_maths(q, k, e0, gate, col, ends, states, coef=coef, momentum=momentum,
                         grad_clip=grad_clip)
    return new, y


def _named_rows(rows: jax.Array, momentum: bool, grad_clip: float):
    """``rows [N, B, H, 8, C]`` as the rows ``chunk_maths`` reads ({name: ``[N, B, H,
    C]``}) and the chunk scalars ({end name: ``[N, B, H]``})."""
    names = ["beta", "w_g"] + (["f", "w_h"] if momentum else []) + (
        ["k_sq"] if grad_clip > 0 else [])
    ends = ["end_beta"] + (["end_f", "end_m"] if momentum else [])
    return ({name: rows[..., ROWS.index(name), :] for name in names},
            {name: rows[..., ROWS.index(name), 0] for name in ends})


def reference(q, k, e0, gate, rows, states, *, coef: float, momentum: bool,
              grad_clip: float):
    """The recurrence in jnp: ``lax.scan`` over chunks of ``chunk_step`` batched over
    (B, H).  Returns (y ``[N, B, H, C, d_v]``, the final states)."""
    step = functools.partial(_step, coef=coef, momentum=momentum, grad_clip=grad_clip)
    return chunk_scan.reference(step, tuple(states),
                                (q, k, e0, gate, *_named_rows(rows, momentum, grad_clip)))


def chunk_recurrence(q, k, e0, gate, rows, mt0, st0=None, *, coef: float, momentum: bool,
                     grad_clip: float = 0.0, interpret: bool | None = None,
                     body: str = "auto", save_every: int = 1):
    """Dispatch: the recurrence in the chunk-scan kernels, forward and backward
    (``chunk_scan.chunk_scan``; ``save_every`` chunks per saved boundary state).

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
    step = functools.partial(_step, coef=float(coef), momentum=bool(momentum),
                             grad_clip=float(grad_clip))
    xs = (q, k, e0, gate, *_named_rows(rows, momentum, grad_clip))
    y, final = chunk_scan.chunk_scan(step, states, xs,
                                     save_every=save_every, body=body, interpret=interpret)
    return y, final[0], (final[1] if momentum else st0)
